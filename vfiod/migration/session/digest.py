"""Content digests of guest RAM, kept current incrementally on both ends of a migration
(docs/architecture.md §1 step 5 "destination verifies"; §5 manifest).

The stream's MANIFEST proves the destination received exactly the records the source sent.
This module proves the next thing: that the destination's RAM, once loaded, has the same
*content* as the source's RAM at the moment it stopped. Both ends keep one CRC-32C per
guest page of their own memory (the stream's own per-page checksum kernel,
``stream.pagecrc``: several GB/s, GIL released). A region's digest is BLAKE2b-128 over the
CRCs of its page table taken in 16 KiB groups (``digest_root``: only the groups whose pages
changed are folded again, so a commit's digest costs what its last pass changed).

Incremental, so verification costs little downtime, and one CRC per page per end where
the stream's own is exact (docs/protocol.md §7.3): ``take_page_crcs`` stores a CRC the
stream computed of a page that cannot change afterwards, ``touch`` marks a page to be read
again by the next ``rehash``.

* Destination: every page's CRC comes from the stream reader (or the RAM channel thread)
  that landed and checked it, computed over the landed bytes; nothing else writes the
  landing memory during a migration, so the destination never reads a page twice.
* Source: a page sent while the guest runs (pre-copy) is touched and read again after
  its pass, because the guest may have written it after its CRC was computed, and the
  digest must be the memory's, so that a write dirty tracking missed still shows. A page
  sent in stop-and-copy (guest and devices stopped) takes the CRC of its record: that is
  its content at the pause, and it clears a pending touch from an earlier live send. The
  final ``rehash`` reads only the pages sent live and not read since.

Pages never touched keep the CRC of a zero page: both ends start from zeroed memory (a
fresh memfd on the destination; pages the source skips in its first pass were zero when it
scanned them, and any later write makes them dirty).

What it proves and what it cannot: the destination's memory equals the source's memory as
hashed, so a record applied at the wrong place on either side, a torn or stale pre-copy
page that was not re-sent, or a lost record show up, by region. A write the dirty tracker
never reported is caught if it came between the page's live send and the re-hash after
that pass; one after that re-hash leaves the source's hash stale as well, and only a full
hash of both memories after the migration (``full_ram_digest``, out of the downtime
window) catches it, and the demo and the tests run it.

Threads: RAM channels hand CRCs in from their own threads; one lock orders every change
to the tables (a channel's CRCs of pass *k+1* are never older than what a ``rehash`` of
pass *k* computes, whichever runs first).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from numba import njit

from vfiod.migration.session.costs import CostModel
from vfiod.migration.session.digest_root import GroupedRoot
from vfiod.migration.stream.crc32c import crc32c
from vfiod.migration.stream.pagecrc import page_crcs
from vfiod.vfio import RamRegion


@lru_cache(maxsize=8)
def zero_crc(length: int) -> int:
    return crc32c(bytes(length))


@njit(nogil=True, cache=True)
def _count_in_runs(table, lo, hi, value):
    """How many of ``table[lo[r]:hi[r]]``, over every run r, equal ``value`` (one pass
    over the runs' pages, nothing allocated: a final pass may be millions of pages)."""
    n = 0
    for r in range(lo.shape[0]):
        for i in range(lo[r], hi[r]):
            if table[i] == value:
                n += 1
    return n


def warm_up() -> None:
    """Compile or load ``never_landed``'s kernel now (the source's setup), not in the
    first prediction; only the source counts, so only it loads it."""
    one = np.ones(1, dtype=np.int64)
    _count_in_runs(np.zeros(2, dtype=np.uint32), one - 1, one, np.uint32(0))


@dataclass(frozen=True)
class RegionDigest:
    name: str
    pages: int
    digest: str

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "pages": self.pages, "digest": self.digest}

    @classmethod
    def from_dict(cls, d: object) -> RegionDigest:
        if not (isinstance(d, dict) and isinstance(d.get("name"), str)
                and isinstance(d.get("pages"), int) and isinstance(d.get("digest"), str)):
            raise ValueError(f"region digest {d!r} needs name, pages, digest")
        return cls(d["name"], d["pages"], d["digest"])


class RamDigests:
    """Per-page CRCs of each region over ``views`` (the RAM as this process maps it)."""

    def __init__(self, regions: Sequence[RamRegion], views: Sequence[Any],
                 page_size: int, clock: Callable[[], float] = time.perf_counter) -> None:
        if len(regions) != len(views):
            raise ValueError(f"{len(regions)} regions but {len(views)} views")
        if [r.gpa for r in regions] != sorted(r.gpa for r in regions):
            raise ValueError("digest regions must be given in guest-address order")
        self.page_size = page_size
        self.regions = tuple(regions)
        self._views = [memoryview(v).cast("B") for v in views]
        self._first = [r.gpa // page_size for r in regions]
        self._end = [(r.gpa + r.size) // page_size for r in regions]
        self._crcs = [np.full(r.size // page_size, zero_crc(page_size), dtype=np.uint32)
                      for r in regions]
        self._touched = [np.zeros(len(c), dtype=bool) for c in self._crcs]
        self._roots = [GroupedRoot(c) for c in self._crcs]
        #: a region may hold touched pages (``rehash`` skips the others without a scan)
        self._maybe_touched = [False] * len(regions)
        self._lock = threading.Lock()
        self._clock = clock
        self.hash_seconds = 0.0       # time spent hashing, in total
        self.hashed_bytes = 0         # bytes read again from memory by ``rehash``
        self.taken_pages = 0          # pages whose CRC came from the stream
        self.last_rehash_s = 0.0
        self.last_rehash_pages = 0
        self.last_roots_groups = 0    # groups the last ``roots`` had to fold
        #: time per hashed byte and per run, for predicting the final re-hash
        self.cost = CostModel(prior_per_item_s=10e-6)

    def _pieces(self, first: int, count: int) -> Iterator[tuple[int, int, int]]:
        """(region index, start, end) of pages [first, first+count), per region, the
        bounds relative to the region's first page."""
        end = first + count
        i = bisect.bisect_right(self._first, first) - 1
        while count > 0 and 0 <= i < len(self.regions):
            lo, hi = max(first, self._first[i]), min(end, self._end[i])
            if hi > lo:
                yield i, lo - self._first[i], hi - self._first[i]
            if end <= self._end[i]:
                break
            i += 1

    def touch_range(self, first: int, count: int) -> None:
        """Pages [first, first+count) may have changed since their CRC: re-hash them."""
        with self._lock:
            for i, lo, hi in self._pieces(first, count):
                self._touched[i][lo:hi] = True
                self._maybe_touched[i] = True

    def take_page_crcs(self, first_page: int, crcs: np.ndarray) -> None:
        """The stream's CRCs of pages [first_page, first_page+len(crcs)), exact for their
        content from now on (``stream.pagecrc.PageCrcSink``): stored, not re-read."""
        with self._lock:
            for i, lo, hi in self._pieces(first_page, len(crcs)):
                at = self._first[i] + lo - first_page
                self._crcs[i][lo:hi] = crcs[at:at + hi - lo]
                self._roots[i].changed(lo, hi)
                self._touched[i][lo:hi] = False
                self.taken_pages += hi - lo

    def take_runs_crcs(self, firsts: Sequence[int], counts: Sequence[int],
                       crcs: np.ndarray) -> None:
        """``take_page_crcs`` for many runs, under the lock once (a send batch, a RAM_RUNS
        record: hundreds of short runs, whose bookkeeping one by one cost more than
        their CRCs)."""
        n = np.asarray(counts, dtype=np.int64)
        pages = (np.repeat(np.asarray(firsts, dtype=np.int64) - (np.cumsum(n) - n), n)
                 + np.arange(len(crcs)))
        region = np.searchsorted(self._first, pages, side="right") - 1
        with self._lock:
            for i in np.unique(region[region >= 0]).tolist():
                sel = (region == i) & (pages < self._end[i])
                idx = pages[sel] - self._first[i]
                self._crcs[i][idx] = crcs[sel]
                self._touched[i][idx] = False
                self._roots[i].changed_pages(idx)
                self.taken_pages += len(idx)

    def touch(self, first: np.ndarray | Sequence[int],
              count: np.ndarray | Sequence[int]) -> None:
        """Many runs at once (the source, per slice it sent)."""
        f = np.asarray(first, dtype=np.int64)
        n = np.asarray(count, dtype=np.int64)
        if f.size <= 256:
            for a, b in zip(f.tolist(), n.tolist(), strict=True):
                self.touch_range(a, b)
            return
        for i, touched in enumerate(self._touched):
            lo = np.maximum(f, self._first[i]) - self._first[i]
            hi = np.minimum(f + n, self._end[i]) - self._first[i]
            sel = hi > lo
            if not sel.any():
                continue
            mark = np.zeros(len(touched) + 1, dtype=np.int32)
            np.add.at(mark, lo[sel], 1)
            np.add.at(mark, hi[sel], -1)
            with self._lock:
                touched |= np.cumsum(mark[:-1]) > 0
                self._maybe_touched[i] = True

    def never_landed(self, first: np.ndarray, count: np.ndarray) -> int:
        """Pages of the runs (first page, count) whose CRC is still a zero page's: never
        sent (both ends start from zero), so never landed at the destination either
        (``first_touch``: a page its memory may not hold yet). A page sent while all
        zero counts too; the first pass skips those."""
        f = np.asarray(first, dtype=np.int64)
        end = f + np.asarray(count, dtype=np.int64)
        z = zero_crc(self.page_size)
        n = 0
        with self._lock:
            for i, crcs in enumerate(self._crcs):
                lo = np.maximum(f, self._first[i]) - self._first[i]
                hi = np.minimum(end, self._end[i]) - self._first[i]
                sel = hi > lo
                if sel.any():
                    n += int(_count_in_runs(crcs, lo[sel], hi[sel], np.uint32(z)))
        return n

    @property
    def pending_pages(self) -> int:
        with self._lock:
            return int(sum(int(t.sum()) for t in self._touched))

    def pending_runs(self) -> int:
        """Runs of touched pages (each one kernel call of the next ``rehash``)."""
        with self._lock:
            return sum(int(np.count_nonzero(np.diff(t.view(np.int8), prepend=0) == 1))
                       for t, m in zip(self._touched, self._maybe_touched, strict=True) if m)

    def rehash(self) -> int:
        """Hash every touched page now, run by run; returns how many pages."""
        t0 = self._clock()
        ps = self.page_size
        done = runs = 0
        with self._lock:
            for i, (view, crcs, touched) in enumerate(zip(self._views, self._crcs,
                                                          self._touched, strict=True)):
                if not self._maybe_touched[i]:
                    continue
                self._maybe_touched[i] = False
                idx = np.flatnonzero(touched)
                if not idx.size:
                    continue
                for a, b in _runs(idx):
                    page_crcs(view[a * ps:b * ps], ps, out=crcs[a:b])
                    self._roots[i].changed(a, b)
                    runs += 1
                touched[:] = False
                done += idx.size
        self.hashed_bytes += done * ps
        self.last_rehash_s = self._clock() - t0
        if done:                    # an empty re-hash says nothing of the cost per byte
            self.cost.add(done * ps, runs, self.last_rehash_s)
        self.last_rehash_pages = done
        self.hash_seconds += self.last_rehash_s
        return done

    def pass_ended(self) -> int:
        """The source, after each pre-copy pass: ``rehash`` it, then ``fold``; returns the
        pages re-hashed."""
        done = self.rehash()
        self.fold()
        return done

    def fold(self) -> None:
        """Fold every group changed since the last fold into its region's digest now, so
        that the digest at the commit folds only what the final pass changed (the source
        after each pre-copy pass, the destination at each pass mark)."""
        with self._lock:
            for g in self._roots:
                g.root()

    def figures(self, prefix: str) -> dict[str, float | int]:
        """What hashing cost this end, for the migration's verification report."""
        return {f"{prefix}hash_total_s": self.hash_seconds,
                f"{prefix}hashed_bytes": self.hashed_bytes,
                f"{prefix}stream_crc_pages": self.taken_pages,
                f"{prefix}final_rehash_pages": self.last_rehash_pages,
                f"{prefix}final_digest_groups": self.last_roots_groups}

    def roots(self) -> list[RegionDigest]:
        """Each region's digest (call ``rehash`` first for a current answer)."""
        with self._lock:
            before = sum(g.folded_groups for g in self._roots)
            out = [RegionDigest(r.name, len(c), g.root())
                   for r, c, g in zip(self.regions, self._crcs, self._roots, strict=True)]
            self.last_roots_groups = sum(g.folded_groups for g in self._roots) - before
            return out


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive indexes in a sorted index array."""
    if not idx.size:
        return []
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([idx[0]], idx[cuts]))
    ends = np.concatenate((idx[cuts - 1] + 1, [idx[-1] + 1]))
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def compare_roots(source: Sequence[RegionDigest], dest: Sequence[RegionDigest]) -> list[str]:
    """Every region whose digest differs, as sentences (empty: equal)."""
    out = []
    mine = {d.name: d for d in dest}
    if len(source) != len(dest):
        out.append(f"the source digests {len(source)} RAM regions, the destination "
                   f"{len(dest)}")
    for s in source:
        d = mine.get(s.name)
        if d is None:
            out.append(f"RAM region {s.name}: no destination digest")
        elif (s.pages, s.digest) != (d.pages, d.digest):
            out.append(f"RAM region {s.name}: source content digest {s.digest} over "
                       f"{s.pages} pages, destination {d.digest} over {d.pages}")
    return out
