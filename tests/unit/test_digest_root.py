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
