"""One dirty bitmap per guest over guest-physical pages, and the dirty rate (docs/architecture.md §3, §4).

Providers hand in per-mapping bitmaps in the kernel's layout (docs/kernel-contract.md §3.9: bit ``i``
covers ``iova + i * pgsize``; §4.4 the same for iommufd). A mapping starts at a guest page
that need not be a multiple of 64, and the IOMMU page size may differ from the guest's, so
``merge_container`` rescales (when the sizes differ) and OR-merges at an unaligned offset.
The RAM sender then takes ``take_runs`` (or ``runs``/``take_and_clear``) of what it is
about to send.

Merges, marks and takes hold one lock: two containers whose mappings share a boundary word
would otherwise lose bits in a read-modify-write race. The kernels release the GIL, so
other Python threads keep running while one merge is in progress.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from vfiod.dirty import bitmap_kernels as kernels
from vfiod.dirty.bitmap_args import (
    Pages,
    check_count,
    check_page_size,
    check_span,
    check_words,
    rescaled_nbits,
)
from vfiod.dirty.bitmap_words import ALL
from vfiod.dirty.ranges import PageRange
from vfiod.dirty.report_in_place import report_in_place
from vfiod.vfio.bitmap import Bitmap, words_for


class GlobalBitmap:
    """Dirty bits of ``npages`` guest pages of ``page_size`` bytes (bit ``i`` = guest page i)."""

    def __init__(self, npages: int, page_size: int = 4096) -> None:
        self.npages = check_count("GlobalBitmap", "npages", npages)
        self.page_size = check_page_size("GlobalBitmap", "page_size", page_size)
        self._words: Bitmap = np.zeros(words_for(self.npages), dtype=np.uint64)
        #: dirty pages, kept where an operation knows how many it added (None: unknown,
        #: ``count`` counts again)
        self._count: int | None = 0
        #: word ranges [w0, w1) given to in-place reports since the bitmap was last all
        #: clear; every other word is still 0 (None: unknown). A set: a guest's segments
        #: are few and come back at every sync.
        self._touched: set[tuple[int, int]] | None = set()
        #: word ranges an in-place report left all ones since the last clearing: OR-ing
        #: never clears a bit, so only a take or a clear forgets them
        self._full: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    @property
    def words(self) -> Bitmap:
        """A live read-only view of the words (bits past ``npages`` are always clear)."""
        view = self._words.view()
        view.flags.writeable = False
        return view

    def _range(self, fn: str, pages: PageRange | None) -> PageRange:
        if pages is None:
            return PageRange(0, self.npages)
        if not isinstance(pages, PageRange):
            raise ValueError(f"GlobalBitmap.{fn}: pages must be a PageRange or None, got "
                             f"{type(pages).__name__}")
        if pages.end > self.npages:
            raise ValueError(f"GlobalBitmap.{fn}: guest pages [{pages.first}, {pages.end}) "
                             f"extend past the guest's {self.npages} pages")
        return pages

    def merge_container(self, bitmap: Bitmap, first_guest_page: int, nbits: int,
                        src_pgsize: int | None = None) -> int:
        """OR a mapping's dirty bitmap into the guest's, starting at ``first_guest_page``.

        ``bitmap`` has ``nbits`` bits of ``src_pgsize``-byte IOMMU pages (default: the guest
        page size); when that differs from the guest page size the bits are rescaled first
        (a coarser guest page is dirty if any IOMMU page in it is; a finer one is dirty if
        its IOMMU page is). Returns the number of guest pages the mapping covers.
        """
        fn = "GlobalBitmap.merge_container"
        bitmap = check_words(fn, "bitmap", bitmap)
        first = check_count(fn, "first_guest_page", first_guest_page)
        nbits = check_count(fn, "nbits", nbits)
        sp = self.page_size if src_pgsize is None else check_page_size(fn, "src_pgsize",
                                                                        src_pgsize)
        check_span(fn, "bitmap", bitmap, 0, nbits)
        pages = rescaled_nbits(nbits, sp, self.page_size)
        if first + pages > self.npages:
            raise ValueError(f"{fn}: {nbits} pages of {sp} bytes at guest page {first} cover "
                             f"guest pages [{first}, {first + pages}), past the guest's "
                             f"{self.npages} pages")
        if sp != self.page_size:
            bitmap = kernels.rescale(bitmap, sp, self.page_size, nbits)
        with self._lock:
            self._count = self._touched = None
            kernels.or_merge(self._words, bitmap, first, pages)
        return pages

    def merge_and_count(self, bitmap: Bitmap, first_guest_page: int, nbits: int) -> int:
        """OR ``nbits`` bits of guest-page-sized pages in at ``first_guest_page`` (no
        rescaling) and return how many of them are set: one pass over the bitmap where
        ``merge_container`` followed by a popcount would take two."""
        fn = "GlobalBitmap.merge_and_count"
        bitmap = check_words(fn, "bitmap", bitmap)
        first = check_count(fn, "first_guest_page", first_guest_page)
        nbits = check_count(fn, "nbits", nbits)
        check_span(fn, "bitmap", bitmap, 0, nbits)
        if first + nbits > self.npages:
            raise ValueError(f"{fn}: {nbits} pages at guest page {first} cover guest pages "
                             f"[{first}, {first + nbits}), past the guest's {self.npages} pages")
        with self._lock:
            self._count = self._touched = None
            return kernels.or_merge(self._words, bitmap, first, nbits)

    def merge_report(self, write: Callable[[Bitmap], object], first_guest_page: int,
                     nbits: int) -> int | None:
        """OR a report of ``nbits`` guest pages from ``first_guest_page`` (a multiple of
        64) in by letting ``write`` put it over this bitmap's own words (type1
        GET_BITMAP) and restoring what they held (``report_in_place``); returns the
        report's set bits, or None (``write`` not called) when the words hold too much."""
        fn = "GlobalBitmap.merge_report"
        first = check_count(fn, "first_guest_page", first_guest_page)
        nbits = check_count(fn, "nbits", nbits)
        if first + nbits > self.npages:
            raise ValueError(f"{fn}: {nbits} pages at guest page {first} cover guest pages "
                             f"[{first}, {first + nbits}), past the guest's {self.npages} pages")
        w0, w1 = first // 64, words_for(first + nbits)
        with self._lock:
            touched = self._touched
            value: int | None = None
            if touched is not None and all(b <= w0 or a >= w1 for a, b in touched):
                value = 0
            elif any(a <= w0 and w1 <= b for a, b in self._full):
                value = int(ALL)
            if touched is not None:
                touched.add((w0, w1))     # before: a failed write leaves bits there too
            known, self._count = self._count, None      # unknown if ``write`` fails
            done = report_in_place(self._words, first, nbits, write, known=value)
            self._count = known if done is None or known is None else known + done.added
            if done is not None and done.full:
                self._full.add((w0, w1))
            return None if done is None else done.reported

    def mark_all(self, pages: PageRange | None = None) -> None:
        """Mark ``pages`` (default: every page) dirty, e.g. for a tracker that cannot see DMA."""
        r = self._range("mark_all", pages)
        with self._lock:
            self._count = self._touched = None
            kernels.set_range(self._words, r.first, r.count)

    def count(self) -> int:
        """Number of dirty guest pages (counted only when no operation since the last
        count kept the number: a sync whose reports all went in place reads no word)."""
        with self._lock:
            if self._count is None:
                self._count = kernels.popcount(self._words, self.npages)
            return self._count

    def dirty_bytes(self) -> int:
        return self.count() * self.page_size

    def runs(self, max_run: int) -> tuple[Pages, Pages]:
        """Dirty pages as ``(first_page, count)`` runs of at most ``max_run`` pages."""
        with self._lock:
            return kernels.dirty_runs(self._words, self.npages, max_run)

    def take_runs(self, max_run: int) -> tuple[Pages, Pages]:
        """``runs(max_run)`` and ``clear()`` in one locked step."""
        with self._lock:
            runs = kernels.dirty_runs(self._words, self.npages, max_run)
            self._words[:] = 0
            self._count, self._touched, self._full = 0, set(), set()
            return runs

    def take_and_clear(self, pages: PageRange | None = None) -> Bitmap:
        """Return the bits of ``pages`` (bit 0 = ``pages.first``) and clear them here."""
        r = self._range("take_and_clear", pages)
        with self._lock:
            self._count = self._touched = None
            self._full = set()
            return kernels.test_and_clear(self._words, r.first, r.count)

    def clear(self) -> None:
        with self._lock:
            self._words[:] = 0
            self._count, self._touched, self._full = 0, set(), set()

    def release_if_clear(self) -> bool:
        """When no page is dirty, give the words' memory back (tracking stopped after the
        last pass was taken: a finished migration need not hold a bitmap of its guest
        until the next one starts). Fresh zeroed words take their place: ``np.zeros`` is
        calloc, a bitmap above the daemon's 128 KiB mmap threshold (4 GiB of guest) is a
        mapping of its own, so the new words are not resident until written and the old
        ones go back to the kernel. Dirty pages are kept, words and all. Returns whether
        the words were released."""
        with self._lock:
            if self._count is None:
                self._count = kernels.popcount(self._words, self.npages)
            if self._count:
                return False
            self._words = np.zeros(words_for(self.npages), dtype=np.uint64)
            self._touched, self._full = set(), set()
            return True


class DirtyRate:
    """Dirty bytes per second between syncs, from counts and timestamps passed in.

    Call ``start(t)`` when tracking starts (or let the first ``sample`` be the baseline),
    then ``sample(pages, t)`` at each sync with the pages found dirty since the previous
    sync. Timestamps are monotonic seconds from the caller (nothing here reads a clock).
    ``last`` is the rate over the latest interval, ``smoothed`` an EWMA with weight
    ``alpha`` on the newest interval.
    """

    def __init__(self, page_size: int, alpha: float = 0.5) -> None:
        self.page_size = check_page_size("DirtyRate", "page_size", page_size)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"DirtyRate: alpha must be in (0, 1], got {alpha!r}")
        self.alpha = alpha
        self._t: float | None = None
        self.last: float | None = None
        self.smoothed: float | None = None

    def start(self, t: float) -> None:
        """Tracking started at ``t``: the first sample's interval begins here."""
        self._t = float(t)

    def sample(self, dirty_pages: int, t: float) -> float | None:
        """Record a sync at ``t`` that found ``dirty_pages``; return that interval's rate.

        Returns ``None`` (and only sets the baseline) when there is no earlier timestamp.
        """
        pages = check_count("DirtyRate.sample", "dirty_pages", dirty_pages)
        t = float(t)
        if self._t is None:
            self._t = t
            return None
        if t <= self._t:
            raise ValueError(f"DirtyRate.sample: timestamp {t} is not after the previous "
                             f"sync at {self._t}")
        rate = pages * self.page_size / (t - self._t)
        self._t = t
        self.last = rate
        self.smoothed = rate if self.smoothed is None else (
            self.alpha * rate + (1.0 - self.alpha) * self.smoothed)
        return rate
