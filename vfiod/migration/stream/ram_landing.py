"""Landing one RAM record's payload in guest memory and checking it (docs/protocol.md §7:
the record's checksum table, then its pages; §7.3: the landed pages' CRCs are the
destination's content digests). The one place both the main stream's reader and a RAM
channel's reader (docs/protocol.md §12) land a record.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vfiod.migration.stream.crc32c import crc32c
from vfiod.migration.stream.pagecrc import PageCrcSink, page_crcs
from vfiod.migration.stream.ram import GuestRam
from vfiod.migration.stream.records import RAM_LIVE, ErrorCode, RecordError

#: fills a view from the stream (``what`` names it in a truncation error)
Fill = Callable[[memoryview, str], object]
#: the reader's error for this record
Fail = Callable[[ErrorCode, str], RecordError]


class RamLanding:
    """Per reader: the scratch tables a record's checksums are read and computed into
    (grown to the largest record seen, bounded by ``Limits.ram_record``)."""

    def __init__(self) -> None:
        self._table = np.empty(0, dtype=np.uint32)   # the per-page CRCs sent
        self._got = np.empty(0, dtype=np.uint32)     # the landed pages' CRCs

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
        if len(self._table) < n:  # n * ps was bounded by the length check above
            self._table = np.empty(n, dtype=np.uint32)
            self._got = np.empty(n, dtype=np.uint32)
        table, got = self._table[:n], self._got[:n]
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
