"""A region's digest kept current by folding only changed groups (digest_root.py;
docs/architecture.md §1 step 5): the same value as a fold from scratch, at the cost of
what changed."""

from __future__ import annotations

import numpy as np
import pytest

from vfiod.migration.session.digest_root import GROUP_PAGES, GroupedRoot, region_root


@pytest.mark.parametrize("pages", [0, 5, GROUP_PAGES, 3 * GROUP_PAGES + 17])
def test_grouped_root_equals_a_fold_from_scratch_after_every_change(pages: int) -> None:
    rng = np.random.default_rng(pages)
    crcs = rng.integers(0, 2**32, pages, dtype=np.uint32)
    g = GroupedRoot(crcs)
    assert g.root() == region_root(crcs)
    for _ in range(30):
        if not pages:
            break
        lo = int(rng.integers(0, pages))
        hi = int(rng.integers(lo + 1, min(pages, lo + 2 * GROUP_PAGES) + 1))
        crcs[lo:hi] = rng.integers(0, 2**32, hi - lo, dtype=np.uint32)
        g.changed(lo, hi)
        assert g.root() == region_root(crcs), (lo, hi)


def test_a_change_not_reported_is_not_seen() -> None:
    """The table is the caller's: ``changed`` is what makes a group fold again (why every
    writer of the table in ``RamDigests`` reports its pages)."""
    crcs = np.zeros(4 * GROUP_PAGES, dtype=np.uint32)
    g = GroupedRoot(crcs)
    before = g.root()
    crcs[GROUP_PAGES + 3] = 7
    assert g.root() == before != region_root(crcs)
    g.changed(GROUP_PAGES + 3, GROUP_PAGES + 4)
    assert g.root() == region_root(crcs)


def test_only_changed_groups_are_folded() -> None:
    """A commit's digest of a large, mostly idle region folds what its last pass changed,
    not the table (16 MiB for a 16 GiB guest)."""
    crcs = np.zeros(1024 * GROUP_PAGES, dtype=np.uint32)     # a 16 GiB guest's table
    g = GroupedRoot(crcs)
    made = g.folded_groups
    assert made == 1024                                      # once, when made
    crcs[[5, GROUP_PAGES * 700 + 1, GROUP_PAGES * 700 + 2]] = 1
    g.changed(5, 6)
    g.changed(GROUP_PAGES * 700 + 1, GROUP_PAGES * 700 + 3)
    assert g.root() == region_root(crcs)
    assert g.folded_groups - made == 2
    g.root()
    assert g.folded_groups - made == 2                       # nothing changed since


def test_many_runs_taken_at_once_equal_the_same_runs_one_by_one() -> None:
    """``RamDigests.take_runs_crcs`` (a RAM_RUNS record, a send batch) keeps what
    ``take_page_crcs`` run by run keeps: the same table, digests and counts, across two
    regions and past a group's end."""
    from vfiod.migration.session.digest import RamDigests
    from vfiod.vfio import RamRegion

    ps = 4096
    regions = (RamRegion("low", 0, 3 * GROUP_PAGES * ps), RamRegion("high", 1 << 32, 64 * ps))
    high = (1 << 32) // ps
    views = [memoryview(bytearray(r.size)) for r in regions]
    one, many = RamDigests(regions, views, ps), RamDigests(regions, views, ps)
    runs = [(3, 2), (GROUP_PAGES - 1, 3), (2 * GROUP_PAGES + 7, 1), (high, 4), (high + 60, 4)]
    rng = np.random.default_rng(3)
    crcs = rng.integers(0, 2**32, sum(n for _, n in runs), dtype=np.uint32)
    at = 0
    for first, n in runs:
        one.take_page_crcs(first, crcs[at:at + n])
        at += n
    many.take_runs_crcs([f for f, _ in runs], [n for _, n in runs], crcs)
    assert many.taken_pages == one.taken_pages == len(crcs)
    assert [r.to_dict() for r in many.roots()] == [r.to_dict() for r in one.roots()]
    # and a page taken one way is pending in neither
    assert many.pending_pages == one.pending_pages == 0
