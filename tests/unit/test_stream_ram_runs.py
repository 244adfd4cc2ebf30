"""RAM_RUNS records (docs/protocol.md §5.4): many short runs of pages in one record.

The writer groups short pieces; the reader lands them exactly, yields one event per run,
hands each page's CRC to the digests, and refuses every malformed record, naming it,
before any byte reaches guest memory."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.mem_pipe import MemPipe
from vfiod.migration.stream import (
    DeviceInfo,
    ErrorCode,
    GuestRam,
    RamLoaded,
    RamRunsLoaded,
    RecordError,
    RecordType,
    StreamHeader,
    StreamReader,
    StreamWriter,
)
from vfiod.migration.stream.crc32c import crc32c
from vfiod.migration.stream.pagecrc import page_crcs
from vfiod.migration.stream.ram_framing import GROUP_BELOW_PAGES, groups
from vfiod.migration.stream.records import (
    PREAMBLE_SIZE,
    RAM_LIVE,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    Limits,
    pack_header,
    pack_preamble,
)
from vfiod.vfio import RamRegion

PS = 4096
REGIONS = (RamRegion("low", 0, 256 * PS), RamRegion("high", 0x200000, 64 * PS))
HIGH = 0x200000 // PS
HEADER = StreamHeader("src", "m", "g", PS, REGIONS, (), ram_runs=True)


def guest_memory() -> list[bytearray]:
    rng = np.random.default_rng(5)
    return [bytearray(rng.integers(0, 256, r.size, dtype=np.uint8).tobytes())
            for r in REGIONS]


def record_types(stream: bytes) -> list[int]:
    out, off = [], PREAMBLE_SIZE
    while off < len(stream):
        rtype, _, _, length, *_ = RECORD_HEADER.unpack_from(stream, off)
        out.append(rtype)
        off += RECORD_HEADER_SIZE + length
    return out


class Crcs:
    """A PageCrcSink that remembers every page's CRC."""

    def __init__(self) -> None:
        self.by_page: dict[int, int] = {}

    def take_page_crcs(self, first_page: int, crcs: np.ndarray) -> None:
        for i, c in enumerate(crcs.tolist()):
            self.by_page[first_page + i] = c

    def take_runs_crcs(self, firsts: list[int], counts: list[int], crcs: np.ndarray) -> None:
        at = 0
        for f, n in zip(firsts, counts, strict=True):
            self.take_page_crcs(f, crcs[at:at + n])
            at += n


def receive(stream: bytes, limits: Limits | None = None, mem: list[bytearray] | None = None
            ) -> tuple[list[RamLoaded | RamRunsLoaded], list[bytearray], Crcs]:
    r = StreamReader(MemPipe(stream), **({"limits": limits} if limits else {}))
    h = r.read_header()
    mem = mem if mem is not None else [bytearray(x.size) for x in h.regions]
    sink = Crcs()
    r.attach_ram(GuestRam(PS, h.regions, mem, writable=True), crcs=sink)
    events = [e for e in r.events() if isinstance(e, RamLoaded | RamRunsLoaded)]
    r.expect_end()
    return events, mem, sink


RUNS = [(3, 1), (7, 5), (20, 2), (40, 63), (110, 1), (HIGH + 2, 3), (HIGH + 9, 1)]


def sent(runs: list[tuple[int, int]], quiescent: bool = True) -> tuple[bytes, list[bytearray]]:
    src = guest_memory()
    p = MemPipe()
    w = StreamWriter(p, HEADER, GuestRam(PS, REGIONS, src), record_bytes=128 * PS)
    w.start()
    w.send_ram(runs, quiescent=quiescent)
    w.finish()
    return bytes(p.data), src


def page(mem: list[bytearray], p: int) -> bytes:
    i, off = (1, p - HIGH) if p >= HIGH else (0, p)
    return bytes(mem[i][off * PS:(off + 1) * PS])


def test_short_runs_travel_in_ram_runs_records_and_land_exactly() -> None:
    stream, src = sent(RUNS)
    types = record_types(stream)
    # five short runs of "low" share one record, the two of "high" another; 63 pages
    # is under the grouping bound too, so nothing here travels as a RAM record
    assert types.count(RecordType.RAM_RUNS) == 2 and RecordType.RAM not in types
    events, dst, crcs = receive(stream)
    # one event per record, with its runs
    assert [r for e in events for r in e.runs] == RUNS      # type: ignore[union-attr]
    assert all(e.verified for e in events) and len(events) == 2
    pages = [f + i for f, n in RUNS for i in range(n)]
    for p in pages:
        assert page(dst, p) == page(src, p)
        assert crcs.by_page[p] == int(page_crcs(page(src, p), PS)[0])
    untouched = set(range(256)) - set(pages)
    assert all(page(dst, p) == bytes(PS) for p in untouched)


def test_long_runs_keep_ram_records_of_their_own() -> None:
    stream, _ = sent([(0, GROUP_BELOW_PAGES), (100, 2), (200, 1)])
    types = record_types(stream)
    assert types.count(RecordType.RAM) == 1 and types.count(RecordType.RAM_RUNS) == 1


def test_grouping_keeps_regions_order_and_bounds() -> None:
    view = memoryview(b"")

    def batch(*pieces: tuple[int, int, int]) -> list[tuple[int, int, int, memoryview]]:
        return [(r, f, n, view) for r, f, n in pieces]

    # a region change, a run that goes back, and a long run each end a group
    b = batch((0, 1, 1), (0, 5, 2), (1, 900, 1), (1, 890, 1), (1, 950, 64), (1, 999, 1))
    assert groups(b, record_pages=1024, max_runs=1024) == [[0, 1], [2], [3], [4], [5]]
    # a record's pages and its runs are bounded
    b = batch(*((0, 10 * i, 3) for i in range(7)))
    assert groups(b, record_pages=9, max_runs=1024) == [[0, 1, 2], [3, 4, 5], [6]]
    assert groups(b, record_pages=1024, max_runs=2) == [[0, 1], [2, 3], [4, 5], [6]]
    # a pass's last group keeps only its last pieces of at most ``tail_pages``
    assert groups(b, record_pages=1024, max_runs=1024, tail_pages=7) == [
        [0, 1, 2, 3, 4], [5, 6]]
    assert groups(b, record_pages=1024, max_runs=1024, tail_pages=3) == [
        [0, 1, 2, 3, 4, 5], [6]]


class Forge:
    """A stream with one hand-made RAM_RUNS record after the HEADER."""

    def __init__(self, header: StreamHeader = HEADER) -> None:
        self.out = bytearray(pack_preamble())
        self.seq = 0
        self._add(RecordType.HEADER, header.to_json())

    def _add(self, rtype: int, payload: bytes, arg0: int = 0, arg1: int = 0,
             crc: int | None = None, flags: int = 0) -> None:
        c = (crc32c(payload) if payload else 0) if crc is None else crc
        self.out += pack_header(rtype, self.seq, len(payload), arg0, arg1, c, flags) + payload
        self.seq += 1

    def runs(self, runs: list[tuple[int, int]], *, pages: int | None = None,
             k: int | None = None, flags: int = 0, bad_page: int | None = None,
             bad_tables: bool = False, fill: int = 0x5A) -> Forge:
        n = sum(c for _, c in runs) if pages is None else pages
        data = bytes([fill]) * (PS * n)
        table = page_crcs(data, PS) if n else np.empty(0, np.uint32)
        if bad_page is not None:
            table[bad_page] ^= 1
        tables = np.array(runs, dtype="<u8").tobytes() + table.tobytes()
        crc = crc32c(tables) ^ (1 if bad_tables else 0)
        self._add(RecordType.RAM_RUNS, tables + data, len(runs) if k is None else k, n,
                  crc=crc, flags=flags)
        return self

    def ram(self, first: int, count: int) -> Forge:
        data = bytes([0x5A]) * (PS * count)
        table = page_crcs(data, PS).tobytes()
        self._add(RecordType.RAM, table + data, first, count, crc=crc32c(table))
        return self

    def manifest_free_end(self) -> bytes:
        return bytes(self.out)


def refused(stream: bytes, code: ErrorCode, *, limits: Limits | None = None) -> RecordError:
    """The record is refused with ``code`` and guest memory holds nothing of it."""
    mem = [bytearray(r.size) for r in REGIONS]
    with pytest.raises(RecordError) as ei:
        receive(stream, limits, mem)
    assert ei.value.code == code, str(ei.value)
    assert ei.value.rtype == RecordType.RAM_RUNS and ei.value.record == 1
    assert all(not any(m) for m in mem), "bytes reached guest memory before the checks"
    return ei.value


@pytest.mark.parametrize("runs,what", [
    ([(5, 2), (6, 1)], "overlapping"),
    ([(9, 1), (5, 1)], "descending"),
    ([(5, 0), (9, 2)], "an empty run"),
    ([(250, 2), (254, 4)], "past the region's end"),
    ([(250, 1), (HIGH, 1)], "across two regions"),
    ([(1 << 62, 1), (3, 1)], "a page number past any memory"),
])
def test_malformed_runs_are_refused_before_guest_memory_is_written(
        runs: list[tuple[int, int]], what: str) -> None:
    pages = max(1, sum(c for _, c in runs))
    err = refused(Forge().runs(runs, pages=pages).manifest_free_end(), ErrorCode.RANGE)
    assert "RAM_RUNS" in str(err), what


def test_counts_that_do_not_add_up_are_refused() -> None:
    refused(Forge().runs([(5, 2), (9, 1)], pages=4).manifest_free_end(), ErrorCode.RANGE)


@pytest.mark.parametrize("k,what", [(0, "no run"), (3, "more runs than the table has")])
def test_a_run_count_that_does_not_match_the_length_is_refused(k: int, what: str) -> None:
    err = refused(Forge().runs([(5, 2), (9, 1)], k=k).manifest_free_end(), ErrorCode.LENGTH)
    assert "RAM_RUNS length" in str(err), what


def test_more_runs_than_the_limit_are_refused() -> None:
    runs = [(2 * i, 1) for i in range(5)]
    err = refused(Forge().runs(runs).manifest_free_end(), ErrorCode.LENGTH,
                  limits=Limits(ram_runs=4))
    assert "1..4" in str(err)


def test_a_damaged_table_is_refused() -> None:
    refused(Forge().runs([(5, 2), (9, 1)], bad_tables=True).manifest_free_end(),
            ErrorCode.PAYLOAD_CHECKSUM)


def test_a_bad_page_in_a_stop_and_copy_record_is_fatal_and_names_the_guest_page() -> None:
    err = refused(Forge().runs([(5, 2), (9, 3)], bad_page=3).manifest_free_end(),
                  ErrorCode.PAYLOAD_CHECKSUM)
    assert "guest page 0xa (page 3 of 5 in this record)" in str(err)


def test_a_torn_page_of_a_live_record_must_come_again() -> None:
    torn = Forge().runs([(5, 2), (9, 3)], flags=RAM_LIVE, bad_page=3)
    torn._add(RecordType.MANIFEST, b"{}")
    with pytest.raises(RecordError) as ei:
        receive(torn.manifest_free_end())
    assert ei.value.code == ErrorCode.PAYLOAD_CHECKSUM
    assert "1 guest page(s) failed their checksum and were never sent again, first pages " \
           "0xa..0xa" in str(ei.value)


def test_a_live_record_names_its_torn_pages() -> None:
    f = Forge().runs([(5, 2), (9, 3)], flags=RAM_LIVE, bad_page=3)
    r = StreamReader(MemPipe(f.manifest_free_end()))
    h = r.read_header()
    r.attach_ram(GuestRam(PS, h.regions, [bytearray(x.size) for x in h.regions],
                          writable=True))
    ev = next(r.events())
    assert ev == RamRunsLoaded(((5, 2), (9, 3)), (10,)) and not ev.verified


def test_ram_runs_after_end_of_state_is_out_of_order() -> None:
    f = Forge(StreamHeader("src", "m", "g", PS, REGIONS, (DeviceInfo("dev-a", "v2", 1),),
                           ram_runs=True))
    f._add(RecordType.END_OF_STATE, b"", 0)
    f.runs([(5, 1), (9, 1)])
    r = StreamReader(MemPipe(f.manifest_free_end()))
    h = r.read_header()
    r.attach_ram(GuestRam(PS, h.regions, [bytearray(x.size) for x in h.regions],
                          writable=True))
    with pytest.raises(RecordError) as ei:
        list(r.events())
    assert ei.value.code == ErrorCode.ORDER and "RAM_RUNS after END_OF_STATE" in str(ei.value)


def test_a_ram_record_after_ram_runs_clears_the_torn_page() -> None:
    f = Forge().runs([(5, 2), (9, 3)], flags=RAM_LIVE, bad_page=3).ram(10, 1)
    r = StreamReader(MemPipe(f.manifest_free_end()))
    h = r.read_header()
    r.attach_ram(GuestRam(PS, h.regions, [bytearray(x.size) for x in h.regions],
                          writable=True))
    events = r.events()
    got = [next(events) for _ in range(2)]
    assert got[-1] == RamLoaded(10, 1, True)
    assert not r._torn       # the page came again, verified


def test_a_pass_ends_with_a_short_record() -> None:
    """``send_ram(last=True)``: the pass's last record is at most ``TAIL_PAGES``, so the
    destination's check after its last byte is short; the pages are the same."""
    from vfiod.migration.stream.ram_framing import TAIL_PAGES, tapered

    assert tapered([(0, 5), (100, 200)]) == [(0, 5), (100, 200 - TAIL_PAGES),
                                             (300 - TAIL_PAGES, TAIL_PAGES)]
    assert tapered([(0, TAIL_PAGES)]) == [(0, TAIL_PAGES)] and tapered([]) == []
    src = guest_memory()
    p = MemPipe()
    w = StreamWriter(p, HEADER, GuestRam(PS, REGIONS, src), record_bytes=256 * PS)
    w.start()
    w.send_ram([(0, 200)], quiescent=True, last=True)
    w.finish()
    stream = bytes(p.data)
    counts, off = [], PREAMBLE_SIZE
    while off < len(stream):
        rtype, _, _, length, _, arg1, *_ = RECORD_HEADER.unpack_from(stream, off)
        if rtype == RecordType.RAM:
            counts.append(arg1)
        off += RECORD_HEADER_SIZE + length
    assert counts == [200 - TAIL_PAGES, TAIL_PAGES]
    events, dst, _ = receive(stream)
    assert sum(e.count for e in events) == 200  # type: ignore[union-attr]
    assert dst[0][:200 * PS] == src[0][:200 * PS]


def test_page_crcs_at_equals_page_crcs_page_by_page() -> None:
    """The writer's one call for many short runs gives each page's own CRC, with either
    implementation, and refuses an index outside the buffer."""
    from vfiod.migration.stream.crc32c import IMPLEMENTATIONS
    from vfiod.migration.stream.pagecrc import page_crcs_at

    mem = guest_memory()[0]
    pages = np.array([7, 3, 200, 4, 5, 255, 0], dtype=np.int64)
    want = [int(page_crcs(mem[p * PS:(p + 1) * PS], PS)[0]) for p in pages.tolist()]
    for impl in IMPLEMENTATIONS:
        assert page_crcs_at(mem, pages, PS, implementation=impl).tolist() == want, impl
    with pytest.raises(ValueError, match="outside"):
        page_crcs_at(mem, np.array([256], dtype=np.int64), PS)


def test_without_the_headers_offer_there_are_no_ram_runs_records() -> None:
    """A HEADER without ``ram_runs`` (the destination did not offer them): the writer
    sends every run in a RAM record of its own, and a reader refuses a RAM_RUNS record."""
    import dataclasses

    plain = dataclasses.replace(HEADER, ram_runs=False)
    assert b"ram_runs" not in plain.to_json()        # a HEADER an older reader knows
    p = MemPipe()
    w = StreamWriter(p, plain, GuestRam(PS, REGIONS, guest_memory()), record_bytes=128 * PS)
    w.start()
    w.send_ram(RUNS, quiescent=True)
    w.finish()
    types = record_types(bytes(p.data))
    assert RecordType.RAM_RUNS not in types and types.count(RecordType.RAM) == len(RUNS)
    f = Forge(plain).runs([(5, 1), (9, 1)])
    err = refused(f.manifest_free_end(), ErrorCode.ORDER)
    assert "RAM_RUNS, but the HEADER did not offer them" in str(err)
