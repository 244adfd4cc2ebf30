"""Live (pre-copy) RAM records: pages the guest writes during the send must come again."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.mem_pipe import MemPipe
from vfiod.migration.stream import (
    ErrorCode,
    GuestRam,
    RamLoaded,
    RecordError,
    RecordType,
    StreamHeader,
    StreamReader,
    StreamWriter,
)
from vfiod.migration.stream.crc32c import crc32c
from vfiod.migration.stream.pagecrc import page_crcs
from vfiod.migration.stream.records import RAM_LIVE, pack_header, pack_preamble
from vfiod.migration.stream.torn import TornPages
from vfiod.vfio import RamRegion

PS = 4096
REGIONS = (RamRegion("ram", 0, 32 * PS),)
HEADER = StreamHeader("s", "m", "g", PS, REGIONS, ())


class GuestWritesDuringSend(MemPipe):
    """A sink that lets the 'guest' write a page after the writer checksummed it and
    before the bytes are copied out, as a running guest can."""

    def __init__(self, mem: bytearray, page: int, times: int = 1) -> None:
        super().__init__()
        self.mem, self.page, self.times = mem, page, times

    def send_buffers(self, buffers: Any) -> None:
        if self.times:
            self.times -= 1
            self.mem[self.page * PS] ^= 0x5A
        super().send_buffers(buffers)


def receive(pipe: Any) -> tuple[StreamReader, bytearray, list[Any]]:
    r = StreamReader(pipe)
    h = r.read_header()
    dst = bytearray(h.regions[0].size)
    r.attach_ram(GuestRam(PS, h.regions, [dst], writable=True))
    return r, dst, list(r.events())


def test_a_page_written_during_a_live_send_is_repaired_by_the_next_pass() -> None:
    mem = bytearray(bytes(range(256)) * (REGIONS[0].size // 256))
    pipe = GuestWritesDuringSend(mem, page=9)
    w = StreamWriter(pipe, HEADER, GuestRam(PS, REGIONS, [mem]), record_bytes=8 * PS)
    w.start()                       # (the guest's write lands in this first batch's send)
    pipe.times = 1
    w.send_ram([(0, 32)], quiescent=False)
    w.send_ram([(9, 1)], quiescent=True)   # dirty tracking found page 9: stop-and-copy
    w.finish()
    r, dst, events = receive(pipe)
    assert dst == mem
    assert RamLoaded(8, 8, verified=False) in events
    assert events[-2] == RamLoaded(9, 1, verified=True)
    assert r.torn_records == 1


def test_a_torn_page_never_sent_again_fails_with_its_record() -> None:
    mem = bytearray(REGIONS[0].size)
    pipe = GuestWritesDuringSend(mem, page=20, times=0)
    w = StreamWriter(pipe, HEADER, GuestRam(PS, REGIONS, [mem]), record_bytes=8 * PS)
    w.start()
    pipe.times = 1
    w.send_ram([(0, 32)], quiescent=False)
    w.send_ram([(16, 4), (21, 3)], quiescent=True)   # re-sends around page 20, not page 20
    w.finish()
    with pytest.raises(RecordError) as ei:
        receive(pipe)
    e = ei.value
    assert e.code == ErrorCode.PAYLOAD_CHECKSUM and e.rtype == RecordType.RAM
    assert e.record == 3  # pages 16..23, the fourth record after the HEADER
    assert "1 guest page(s) failed their checksum and were never sent again" in str(e)
    assert "first pages 0x14..0x14" in str(e)


def test_a_damaged_live_record_is_caught_if_nothing_resends_it() -> None:
    # Corruption in transit of a page the guest did not touch: never re-sent, so caught.
    out = bytearray(pack_preamble())
    hdr = HEADER.to_json()
    out += pack_header(RecordType.HEADER, 0, len(hdr), 0, 0, crc32c(hdr)) + hdr
    page = bytes(PS)
    table = (page_crcs(page, PS) ^ 1).astype("<u4").tobytes()  # this page's CRC is wrong
    at = len(out)
    out += pack_header(RecordType.RAM, 1, PS + 4, 3, 1, crc32c(table), flags=RAM_LIVE)
    out += table + page
    m = b'{"ram":[],"devices":[],"records":2}'
    out += pack_header(RecordType.MANIFEST, 2, len(m), 0, 0, crc32c(m)) + m

    class Src:
        pos = 0

        def recv_into(self, v: memoryview) -> int:
            n = min(len(v), len(out) - self.pos)
            v[:n] = out[self.pos:self.pos + n]
            self.pos += n
            return n

    with pytest.raises(RecordError) as ei:
        receive(Src())
    assert (ei.value.code, ei.value.record, ei.value.offset) == (
        ErrorCode.PAYLOAD_CHECKSUM, 1, at)


def test_the_live_flag_is_only_allowed_on_ram() -> None:
    out = bytearray(pack_preamble())
    hdr = HEADER.to_json()
    out += pack_header(RecordType.HEADER, 0, len(hdr), 0, 0, crc32c(hdr), flags=RAM_LIVE) + hdr
    pos = [0]

    class Src:
        def recv_into(self, v: memoryview) -> int:
            n = min(len(v), len(out) - pos[0])
            v[:n] = out[pos[0]:pos[0] + n]
            pos[0] += n
            return n

    with pytest.raises(RecordError) as ei:
        StreamReader(Src()).read_header()
    assert ei.value.code == ErrorCode.FLAGS


def test_torn_pages_interval_set() -> None:
    t = TornPages()
    assert not t
    t.add(10, 5, record=7, offset=700)      # [10, 15)
    t.add(20, 5, record=3, offset=300)      # [20, 25)
    t.add(15, 5, record=9, offset=900)      # bridges them: [10, 25), earliest record 3
    assert t.intervals() == [(10, 25, 3, 300)]
    t.clear(12, 3)                          # [10, 12) and [15, 25)
    assert t.intervals() == [(10, 12, 3, 300), (15, 25, 3, 300)]
    assert t.pages == 12
    t.clear(0, 11)
    t.clear(24, 100)
    assert t.intervals() == [(11, 12, 3, 300), (15, 24, 3, 300)]
    t.add(40, 1, record=1, offset=100)
    assert t.first() == (40, 41, 1, 100)
    t.clear(11, 1)
    t.clear(15, 9)
    t.clear(40, 1)
    assert not t and t.pages == 0
    t.clear(0, 1000)  # clearing nothing is fine
