"""One hash per page per end (docs/protocol.md §7.3): the stream's per-page CRCs become the
content digests where they are exact, and the digests still equal a full read of memory.

The destination takes every landed page's CRC from the reader (main connection) or the RAM
channel thread that checked it, and reads nothing again; the source takes the CRCs of its
stop-and-copy records and reads again only what it sent live and has not read since."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from tests.support.loopback import loopback_pair
from tests.support.mem_pipe import MemPipe
from vfiod.migration.session.digest import RamDigests
from vfiod.migration.stream import Complete, GuestRam, StreamHeader, StreamReader, StreamWriter
from vfiod.migration.stream.channel_hello import ChannelHello, read_channel_hello
from vfiod.migration.stream.pagecrc import page_crcs
from vfiod.migration.stream.records import (
    PREAMBLE_SIZE,
    RECORD_HEADER_SIZE,
    ErrorCode,
    RecordError,
)
from vfiod.migration.transport.channel_receive import ChannelGather, ChannelReader
from vfiod.migration.transport.channel_send import ChannelFanout, ChannelWriter
from vfiod.vfio import RamRegion

PS = 4096
REGIONS = (RamRegion("low", 0, 40 * PS), RamRegion("high", 64 * PS, 24 * PS))
ALL = [(0, 40), (64, 24)]


def header(channels: int) -> StreamHeader:
    return StreamHeader("src", "m1", "g1", PS, REGIONS, (), challenge="c" * 32,
                        channels=channels)


def full_read(views: list[bytearray]) -> list[Any]:
    """The digests of memory read whole: what the incremental ones must equal."""
    d = RamDigests(REGIONS, views, PS)
    d.touch([0, 64], [40, 24])
    d.rehash()
    return d.roots()


class Ends:
    """Source and destination memory, each end's ``RamDigests`` fed by its stream, over one
    connection (``channels`` 1) or RAM channels; the destination reads in a thread."""

    def __init__(self, channels: int) -> None:
        rng = np.random.default_rng(channels)
        self.src = [bytearray(rng.integers(1, 256, r.size, dtype=np.uint8).tobytes())
                    for r in REGIONS]
        self.dst = [bytearray(r.size) for r in REGIONS]
        self.src_dg = RamDigests(REGIONS, self.src, PS)
        self.dst_dg = RamDigests(REGIONS, self.dst, PS)
        self.main = loopback_pair()
        self.chans = [loopback_pair() for _ in range(channels)] if channels > 1 else []
        self.writer = StreamWriter(self.main[0], header(channels),
                                   GuestRam(PS, REGIONS, self.src),
                                   record_bytes=4 * PS, batch_bytes=8 * PS)
        self.writer.attach_crc_sink(self.src_dg)
        self.error: BaseException | None = None
        self.complete = False
        self.writer.start()
        opened = 0
        if self.chans:
            writers = []
            for i, (s, _) in enumerate(self.chans, 1):
                hello = ChannelHello("m1", "c" * 32, i, len(self.chans))
                s.send_buffers(hello.opening())
                opened = PREAMBLE_SIZE + RECORD_HEADER_SIZE + len(hello.to_json())
                writers.append(ChannelWriter(i, s, PS))
            self.writer.attach_channels(ChannelFanout(writers))
        self.thread = threading.Thread(target=self._receive, args=(opened,))
        self.thread.start()

    def _receive(self, opened: int) -> None:
        try:
            r = StreamReader(self.main[1])
            r.read_header()
            ram = GuestRam(PS, REGIONS, self.dst, writable=True)
            r.attach_ram(ram, crcs=self.dst_dg)
            if self.chans:
                readers = []
                for i, (_, d) in enumerate(self.chans, 1):
                    assert read_channel_hello(d).channel == i
                    readers.append(ChannelReader(i, d, ram, offset=opened, crcs=self.dst_dg))
                r.attach_channels(ChannelGather(readers, timeout_s=10))
            self.complete = any(isinstance(ev, Complete) for ev in r.events())
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            self.error = e

    def write(self, page: int, value: int) -> None:
        """The guest writes a page of the source (global page number)."""
        i, base = (0, 0) if page < 64 else (1, 64)
        self.src[i][(page - base) * PS:(page - base + 1) * PS] = bytes([value]) * PS

    def live_pass(self, runs: list[tuple[int, int]], number: int) -> None:
        """A pre-copy pass as the session sends it: live records, pages touched."""
        self.writer.send_ram(runs, quiescent=False)
        self.src_dg.touch([f for f, _ in runs], [n for _, n in runs])
        self.writer.mark_iteration(number)

    def finish(self) -> None:
        self.writer.finish()
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert self.error is None, self.error
        assert self.complete


@pytest.mark.parametrize("channels", [1, 3])
def test_both_ends_digests_equal_a_full_read_with_one_hash_per_page(channels: int) -> None:
    e = Ends(channels)
    e.live_pass(ALL, 1)
    assert e.src_dg.rehash() == 64          # live pages: read again after their pass
    for p in (3, 4, 5, 70):                 # re-dirtied, sent in pass 2
        e.write(p, 0x11)
    e.live_pass([(3, 3), (70, 1)], 2)
    e.src_dg.rehash()
    # the guest pauses with pass 3's pages sent and not read again yet: 3 and 70 are
    # re-sent in stop-and-copy (dirty again), page 20 and 80 are not
    for p in (3, 20, 70, 80):
        e.write(p, 0x22)
    e.live_pass([(3, 1), (20, 1), (70, 1), (80, 1)], 3)
    for p in (3, 70, 12):
        e.write(p, 0x33)                     # written during pass 3: dirty at the pause
    e.writer.send_ram([(3, 1), (12, 1), (70, 1)], quiescent=True)
    e.finish()
    taken = e.src_dg.taken_pages
    assert taken == 3                        # the stop-and-copy records' CRCs
    assert e.src_dg.rehash() == 2            # only 20 and 80: sent live, not read since
    assert e.src_dg.roots() == full_read(e.src)
    # the destination read nothing: each page's CRC came with it, and they are exact
    assert e.dst_dg.rehash() == 0
    assert e.dst_dg.hashed_bytes == 0
    assert e.dst_dg.taken_pages == 64 + 4 + 4 + 3
    assert e.dst_dg.roots() == full_read(e.dst) == full_read(e.src)


@pytest.mark.parametrize("channels", [1, 2])
def test_a_write_never_reported_dirty_still_differs(channels: int) -> None:
    """A page the guest wrote after its live send, never re-sent (a dirty-tracking bug):
    the source reads it again after the pass, so the digests differ."""
    e = Ends(channels)
    e.live_pass(ALL, 1)
    e.write(30, 0x55)                        # after its send; nobody reports it
    e.src_dg.rehash()
    e.writer.send_ram([(31, 1)], quiescent=True)
    e.finish()
    e.src_dg.rehash()
    mine, theirs = e.src_dg.roots(), e.dst_dg.roots()
    assert mine[0] != theirs[0] and mine[1] == theirs[1]


class Recorder:
    def __init__(self) -> None:
        self.taken: list[tuple[int, list[int]]] = []

    def take_page_crcs(self, first_page: int, crcs: np.ndarray) -> None:
        self.taken.append((first_page, crcs.tolist()))

    def take_runs_crcs(self, firsts: list[int], counts: list[int], crcs: np.ndarray) -> None:
        at = 0
        for f, n in zip(firsts, counts, strict=True):
            self.take_page_crcs(f, crcs[at:at + n])
            at += n


def test_the_destination_takes_only_crcs_it_verified() -> None:
    """A corrupted page of a stop-and-copy record is refused as before, and its record's
    CRCs never reach the digests; the records before it did, with the pages' own CRCs."""
    rng = np.random.default_rng(7)
    src = [bytearray(rng.integers(0, 256, r.size, dtype=np.uint8).tobytes()) for r in REGIONS]
    pipe = MemPipe()
    w = StreamWriter(pipe, header(1), GuestRam(PS, REGIONS, src), record_bytes=4 * PS,
                     batch_bytes=8 * PS)
    w.start()
    w.send_ram([(0, 8)], quiescent=True)     # two records of 4 pages
    w.finish()
    page4 = pipe.data.index(bytes(src[0][4 * PS:4 * PS + 64]))
    pipe.data[page4 + PS + 7] ^= 0x01        # page 5, in the second record
    r = StreamReader(pipe)
    r.read_header()
    sink = Recorder()
    r.attach_ram(GuestRam(PS, REGIONS, [bytearray(x.size) for x in REGIONS], writable=True),
                 crcs=sink)
    with pytest.raises(RecordError) as ei:
        list(r.events())
    assert ei.value.code is ErrorCode.PAYLOAD_CHECKSUM and "0x5" in str(ei.value)
    assert [first for first, _ in sink.taken] == [0]
    assert sink.taken[0][1] == page_crcs(src[0][:4 * PS], PS).tolist()
