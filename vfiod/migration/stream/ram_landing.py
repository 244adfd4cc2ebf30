"""Landing one RAM record's payload in guest memory and checking it (docs/protocol.md §7:
the record's checksum table, then its pages; §7.3: the landed pages' CRCs are the
destination's content digests). The one place both the main stream's reader and a RAM
channel's reader (docs/protocol.md §12) land a RAM record; RAM_RUNS records (§5.4, the
main stream only) land here too.

A RAM record's pages are received straight into guest memory and checked right after,
while they are in the cache. A RAM_RUNS record's pages (many short runs, docs/protocol.md
§5.4) are received in one piece into a scratch buffer, checked there in one call, and
copied to their runs by one compiled loop: per run that is a copy, where a receive, a
check call and the Python around them cost 10 µs (docs/benchmarks.md §6), and a stop-and-
copy page that fails its check is refused before any byte of the record reaches guest
memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit

from vfiod.migration.stream.crc32c import crc32c
from vfiod.migration.stream.pagecrc import PageCrcSink, page_crcs
from vfiod.migration.stream.ram import GuestRam
from vfiod.migration.stream.records import RAM_LIVE, RUN_ENTRY, ErrorCode, RecordError

#: guest page numbers above this do not exist (2^64 bytes of 4 KiB pages); bounding the
#: run table's values first keeps every sum below exact in 64 bits
_PAGE_NUMBER_END = 1 << 52

#: fills a view from the stream (``what`` names it in a truncation error)
Fill = Callable[[memoryview, str], object]
#: the reader's error for this record
Fail = Callable[[ErrorCode, str], RecordError]


@njit(nogil=True, cache=True)
def _scatter(dst, src, offsets, lengths):
    """``src``'s words, one run after the other, to ``dst`` at each run's offset (in
    64-bit words: a plain loop LLVM vectorises, 0.47 µs per 4 KiB page against 1.3 for
    a byte-slice assignment, on the project's machine)."""
    at = 0
    for r in range(offsets.shape[0]):
        o = offsets[r]
        for i in range(lengths[r]):
            dst[o + i] = src[at + i]
        at += lengths[r]


def warm_up() -> None:
    """Compile or load the copy kernel now, not inside a downtime."""
    one = np.zeros(1, dtype=np.int64)
    _scatter(np.zeros(1, dtype=np.uint64), np.ones(1, dtype=np.uint64), one, one + 1)


class RamLanding:
    """Per reader: the scratch tables a record's checksums are read and computed into
    (grown to the largest record seen, bounded by ``Limits.ram_record``)."""

    def __init__(self) -> None:
        self._table = np.empty(0, dtype=np.uint32)   # the per-page CRCs sent
        self._got = np.empty(0, dtype=np.uint32)     # the landed pages' CRCs
        self._tables = bytearray()                   # a RAM_RUNS record's two tables
        self._pages = bytearray()                    # ... and its pages, before the copy

    def land(self, ram: GuestRam, first: int, n: int, length: int, crc: int, flags: int, *,
             fill: Fill, fail: Fail, crcs: PageCrcSink | None) -> tuple[int, np.ndarray]:
        """Read the record's table and pages (``n`` pages from ``first``; ``length``,
        ``crc``, ``flags`` from its header) into ``ram``; returns the region index and the
        indexes of pages whose CRC differs, allowed only in a record sent live
        (``RAM_LIVE``). The landed pages' CRCs go to ``crcs``."""
        ps = ram.page_size
        if n == 0 or length != n * (ps + 4):
            raise fail(ErrorCode.LENGTH, f"RAM length {length} is not {n} pages of {ps} "
                       "bytes and their checksums")
        try:
            idx, view = ram.locate(first, n)
        except ValueError as e:
            raise fail(ErrorCode.RANGE, str(e)) from None
        got = self._got_for(n)    # n * ps was bounded by the length check above
        table = self._table[:n]
        fill(memoryview(table).cast("B"), "RAM checksum table")  # type: ignore[arg-type]
        if crc32c(table) != crc:
            raise fail(ErrorCode.PAYLOAD_CHECKSUM,
                       f"RAM pages {first:#x}+{n}: checksum table mismatch")
        fill(view, f"RAM pages ({n} x {ps} bytes)")
        # Checked right after the kernel's copy, while the pages are still in the cache.
        # (A worker thread overlapping this with the next receive was measured slower: the
        # GIL hand-offs and cache traffic cost more than the check.)
        page_crcs(view, ps, got)
        bad = np.flatnonzero(got != table)
        if bad.size and not flags & RAM_LIVE:
            raise fail(ErrorCode.PAYLOAD_CHECKSUM, f"guest page {first + int(bad[0]):#x} "
                       f"(page {int(bad[0])} of {n} in this record): checksum mismatch")
        if crcs is not None:
            crcs.take_page_crcs(first, got)
        return idx, bad

    def land_runs(self, ram: GuestRam, k: int, n: int, length: int, crc: int, flags: int,
                  max_runs: int, *, fill: Fill, fail: Fail,
                  crcs: PageCrcSink | None
                  ) -> tuple[int, list[tuple[int, int, tuple[int, ...]]]]:
        """A RAM_RUNS record (``k`` runs, ``n`` pages in all; docs/protocol.md §5.4) into
        ``ram``; returns the region index and per run (first page, count, pages whose CRC
        differs: allowed only with ``RAM_LIVE``). Every check comes before any byte of
        guest memory is written: the length, the tables' checksum, the runs (at least one
        page each, ascending, disjoint, adding up to ``n``, inside one region), and
        without ``RAM_LIVE`` every page's CRC."""
        ps, entry = ram.page_size, RUN_ENTRY.size
        if not 1 <= k <= max_runs or n < k or length != k * entry + n * (ps + 4):
            raise fail(ErrorCode.LENGTH, f"RAM_RUNS length {length} is not {k} runs "
                       f"(1..{max_runs}) of {n} pages of {ps} bytes and their tables")
        head = k * entry + n * 4
        if len(self._tables) < head:
            self._tables = bytearray(head)
        tables = memoryview(self._tables)[:head]
        fill(tables, "RAM_RUNS run and checksum tables")
        if crc32c(tables) != crc:
            raise fail(ErrorCode.PAYLOAD_CHECKSUM, f"RAM_RUNS of {k} runs: tables checksum "
                       "mismatch")
        runs = np.frombuffer(tables[:k * entry], dtype="<u8").reshape(k, 2)
        firsts, counts = runs[:, 0].astype(np.int64), runs[:, 1].astype(np.int64)
        if (int(runs[:, 0].max()) >= _PAGE_NUMBER_END or int(runs[:, 1].min()) < 1
                or int(runs[:, 1].max()) > n):
            raise fail(ErrorCode.RANGE, f"RAM_RUNS of {k} runs: a run outside guest memory "
                       "or empty")
        if int(counts.sum()) != n or (k > 1 and bool(
                (firsts[1:] < firsts[:-1] + counts[:-1]).any())):
            raise fail(ErrorCode.RANGE, f"RAM_RUNS of {k} runs: the runs do not add up to "
                       f"{n} pages, or are not ascending and disjoint")
        first, end = int(firsts[0]), int(firsts[-1] + counts[-1])
        try:
            idx, span = ram.locate(first, end - first)
        except ValueError as e:
            raise fail(ErrorCode.RANGE, f"RAM_RUNS: {e}") from None
        table = np.frombuffer(tables[k * entry:], dtype=np.uint32)
        if len(self._pages) < n * ps:      # n * ps was bounded by the length check above
            self._pages = bytearray(n * ps)
        pages = memoryview(self._pages)[:n * ps]
        fill(pages, f"RAM_RUNS pages ({n} x {ps} bytes)")
        got = page_crcs(pages, ps, self._got_for(n))
        bad = np.flatnonzero(got != table)
        starts = np.cumsum(counts) - counts               # each run's first payload page
        if bad.size and not flags & RAM_LIVE:
            j = int(bad[0])
            r = int(np.searchsorted(starts, j, side="right")) - 1
            page = int(firsts[r]) + j - int(starts[r])
            raise fail(ErrorCode.PAYLOAD_CHECKSUM, f"guest page {page:#x} (page {j} of {n} "
                       "in this record): checksum mismatch")
        words = ps // 8                  # a page size is a multiple of 8 (page_crcs)
        _scatter(np.frombuffer(span, dtype=np.uint64), np.frombuffer(pages, dtype=np.uint64),
                 (firsts - first) * words, counts * words)
        firsts_l, counts_l = firsts.tolist(), counts.tolist()
        if crcs is not None:
            crcs.take_runs_crcs(firsts_l, counts_l, got)
        if not bad.size:
            return idx, [(f, c, ()) for f, c in zip(firsts_l, counts_l, strict=True)]
        torn: list[list[int]] = [[] for _ in firsts_l]
        for j, r in zip(bad.tolist(), (np.searchsorted(starts, bad, side="right") - 1).tolist(),
                        strict=True):
            torn[r].append(firsts_l[r] + j - int(starts[r]))
        return idx, [(f, c, tuple(t)) for f, c, t in zip(firsts_l, counts_l, torn, strict=True)]

    def _got_for(self, n: int) -> np.ndarray:
        """The landed pages' CRC scratch for ``n`` pages (and the sent table's, grown
        with it)."""
        if len(self._got) < n:
            self._table = np.empty(n, dtype=np.uint32)
            self._got = np.empty(n, dtype=np.uint32)
        return self._got[:n]
