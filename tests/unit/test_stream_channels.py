"""RAM channels at the stream level (docs/protocol.md §12): the writer's fan-out and the
reader's gather over socket pairs, pages checked against the source's memory."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from tests.support.daemons import wait_until
from tests.support.loopback import loopback_pair
from vfiod.migration.stream import (
    Complete,
    GuestRam,
    IterationMark,
    RamLoaded,
    StreamHeader,
    StreamReader,
    StreamWriter,
)
from vfiod.migration.stream.channel_hello import ChannelHello, read_channel_hello
from vfiod.migration.stream.records import (
    PREAMBLE_SIZE,
    RECORD_HEADER_SIZE,
    ErrorCode,
    RecordError,
    RecordType,
    pack_header,
)
from vfiod.migration.transport.channel_receive import ChannelGather, ChannelReader
from vfiod.migration.transport.channel_send import ChannelFanout, ChannelWriter
from vfiod.migration.transport.control import TransportError
from vfiod.migration.transport.tcp import Connection
from vfiod.vfio import RamRegion

PS = 4096
PAGES = 16
REGIONS = (RamRegion("ram0", 0, PAGES * PS),)


def header(channels: int) -> StreamHeader:
    return StreamHeader("src", "m1", "g1", PS, REGIONS, (), challenge="c" * 32,
                        channels=channels)


class Slowed:
    """A channel's receiving end whose first RAM bytes wait for ``go`` (or ``wait_s``)."""

    def __init__(self, conn: Connection, go: threading.Event, wait_s: float) -> None:
        self.conn, self.go, self.wait_s = conn, go, wait_s
        self.first = True

    def recv_into(self, view: memoryview) -> int:
        if self.first:
            self.first = False
            self.go.wait(self.wait_s)
        return self.conn.recv_into(view)

    def shutdown(self) -> None:
        self.conn.shutdown()

    def close(self) -> None:
        self.conn.close()


class Watched:
    """A channel's receiving end that sets ``passed`` once ``after`` bytes came through."""

    def __init__(self, conn: Connection, after: int, passed: threading.Event) -> None:
        self.conn, self.after, self.passed = conn, after, passed
        self.got = 0

    def recv_into(self, view: memoryview) -> int:
        n = self.conn.recv_into(view)
        self.got += n
        if self.got >= self.after:
            self.passed.set()
        return n

    def shutdown(self) -> None:
        self.conn.shutdown()

    def close(self) -> None:
        self.conn.close()


class Rig:
    """Source memory, destination memory, a main pair and ``n`` channel pairs."""

    def __init__(self, n: int) -> None:
        self.src = bytearray(PAGES * PS)
        self.dst = bytearray(PAGES * PS)
        self.main = loopback_pair()
        self.chans = [loopback_pair() for _ in range(n)]
        self.writer = StreamWriter(self.main[0], header(n), GuestRam(PS, REGIONS, [self.src]),
                                   record_bytes=PS, batch_bytes=PS)
        self.events: list[Any] = []
        self.error: BaseException | None = None
        self.opened = 0
        self.attached = threading.Event()

    def open(self, wrap: Any = None) -> ChannelFanout:
        self.writer.start()
        writers = []
        for i, (s, _) in enumerate(self.chans, 1):
            hello = ChannelHello("m1", "c" * 32, i, len(self.chans))
            s.send_buffers(hello.opening())
            self.opened = PREAMBLE_SIZE + RECORD_HEADER_SIZE + len(hello.to_json())
            writers.append(ChannelWriter(i, s, PS))
        fan = ChannelFanout(writers)
        self.writer.attach_channels(fan)
        self.thread = threading.Thread(target=self._receive, args=(wrap,))
        self.thread.start()
        return fan

    def _receive(self, wrap: Any) -> None:
        try:
            r = StreamReader(self.main[1])
            r.read_header()
            ram = GuestRam(PS, REGIONS, [self.dst], writable=True)
            r.attach_ram(ram)
            readers = []
            for i, (_, d) in enumerate(self.chans, 1):
                assert read_channel_hello(d).channel == i
                src = wrap(i, d) if wrap else d
                readers.append(ChannelReader(i, src, ram, offset=self.opened))
            r.attach_channels(ChannelGather(readers, timeout_s=10))
            self.attached.set()
            self.events = list(r.events())
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            self.error = e

    def fill(self, page: int, value: int) -> None:
        self.src[page * PS:(page + 1) * PS] = bytes([value]) * PS

    def join(self) -> None:
        self.thread.join(30)
        assert not self.thread.is_alive()


def test_two_channels_carry_every_page_and_the_manifest_counts_each_channel() -> None:
    rig = Rig(2)
    for p in range(PAGES):
        rig.fill(p, p + 1)
    rig.open()
    assert rig.writer.send_ram([(0, PAGES)], quiescent=False) == PAGES * PS
    rig.writer.mark_iteration(1)
    rig.fill(3, 0xAA)
    rig.writer.send_ram([(3, 1)], quiescent=True)
    manifest = rig.writer.finish()
    rig.join()
    assert rig.error is None
    assert rig.dst == rig.src
    assert [e.name for e in manifest.channels] == ["channel 1", "channel 2"]
    assert sum(e.records for e in manifest.channels) == PAGES + 1
    assert manifest.ram_bytes == (PAGES + 1) * PS
    done = [e for e in rig.events if isinstance(e, Complete)]
    assert done and done[0].manifest == manifest
    # the pass-1 pages are all delivered before the ITERATION mark of pass 1
    mark = next(i for i, e in enumerate(rig.events) if isinstance(e, IterationMark))
    assert sum(e.count for e in rig.events[:mark] if isinstance(e, RamLoaded)) == PAGES


def test_a_page_resent_on_another_channel_is_not_overwritten_by_its_older_copy() -> None:
    """Pass 1 sends page 5 on channel 2, pass 2 sends it again on channel 1. Channel 2 is
    held back until channel 1 has received its pass-2 record (or 1 s): without the
    barrier the old copy would land last."""
    rig = Rig(2)
    rig.fill(0, 1)
    rig.fill(5, 2)
    passed = threading.Event()
    record = RECORD_HEADER_SIZE + 4 + PS

    def wrap(i: int, conn: Connection) -> Any:
        if i == 1:    # pass 1: a record and SYNC; then pass 2's record
            return Watched(conn, 2 * record + RECORD_HEADER_SIZE, passed)
        return Slowed(conn, passed, 1.0)

    rig.open(wrap)
    rig.writer.send_ram([(0, 1), (5, 1)], quiescent=False)   # page 0 -> ch 1, 5 -> ch 2
    rig.writer.mark_iteration(1)
    rig.fill(5, 3)                                           # the guest wrote it again
    rig.writer.send_ram([(5, 1)], quiescent=False)           # -> ch 1
    rig.writer.mark_iteration(2)
    rig.writer.finish()
    rig.join()
    assert rig.error is None
    assert rig.dst[5 * PS] == 3, "the pass-1 copy of page 5 overwrote the pass-2 copy"
    assert rig.dst == rig.src


def test_a_closed_channel_fails_the_send_naming_it() -> None:
    rig = Rig(2)
    for p in range(PAGES):
        rig.fill(p, 7)
    rig.open()
    assert rig.attached.wait(10)
    rig.chans[1][1].shutdown()          # the destination end of channel 2 goes away
    # the destination then stops every channel: the source may meet either first
    with pytest.raises(TransportError, match="RAM channel [12]: send"):
        for _ in range(200):             # until the kernel reports the closed peer
            rig.writer.send_ram([(0, PAGES)], quiescent=True)
    rig.writer.abort("channel lost")
    rig.join()
    # the channel's fault, not the ABORT: its end of stream (a RecordError) or, when the
    # source's bytes met the closed socket first, the reset (a TransportError)
    assert isinstance(rig.error, RecordError | TransportError)
    assert "RAM channel 2" in str(rig.error)


class _EndingChannel:
    """A channel reader that ends (the source closed it) when ``end`` is set."""

    def __init__(self, index: int) -> None:
        self.index, self.synced, self.ended = index, 0, False
        self.records = self.offset = 0
        self.end = threading.Event()
        self.source = self

    def read_record(self) -> int:
        self.end.wait(10)
        return -1

    def shutdown(self) -> None:
        self.end.set()

    def close(self) -> None:
        pass


def test_a_pass_left_short_names_the_channel_that_ended_first() -> None:
    """Once a channel fails the source closes the others too, so by the barrier several
    may have ended: the error names the first, not the lowest-numbered."""
    one, two = _EndingChannel(1), _EndingChannel(2)
    gather = ChannelGather([one, two], timeout_s=10)   # type: ignore[list-item]
    two.end.set()
    wait_until(lambda: two.ended, 10, "channel 2 to end")
    one.end.set()
    wait_until(lambda: one.ended, 10, "channel 1 to end")
    with pytest.raises(RecordError, match="RAM channel 2 closed before pass 1"):
        gather.barrier(1)
    gather.stop()


def test_a_channel_ending_inside_a_pass_fails_the_destination_naming_it() -> None:
    rig = Rig(2)
    rig.fill(0, 1)
    rig.open()
    rig.writer.send_ram([(0, 2)], quiescent=True)
    rig.writer._channels.close(abort=True)  # type: ignore[union-attr]  # no SYNC follows
    rig.writer._channels = None
    rig.writer.mark_iteration(1)
    rig.join()
    assert isinstance(rig.error, RecordError)
    assert "RAM channel" in str(rig.error)
    assert rig.error.code is ErrorCode.TRUNCATED


def test_a_sync_that_miscounts_the_channel_records_is_refused() -> None:
    a, b = loopback_pair()
    ram = GuestRam(PS, REGIONS, [bytearray(PAGES * PS)], writable=True)
    a.send_buffers([pack_header(RecordType.SYNC, 1, 0, 1, 5)])
    r = ChannelReader(1, b, ram, offset=0)
    with pytest.raises(RecordError, match="RAM channel 1: SYNC of pass 1 counting 5"):
        r.read_record()


def test_channel_records_on_the_main_stream_are_refused() -> None:
    a, b = loopback_pair()
    w = StreamWriter(a, header(1), GuestRam(PS, REGIONS, [bytearray(PAGES * PS)]))
    w.start()
    a.send_buffers([pack_header(RecordType.SYNC, 1, 0, 1, 1)])
    r = StreamReader(b)
    r.read_header()
    r.attach_ram(GuestRam(PS, REGIONS, [bytearray(PAGES * PS)], writable=True))
    with pytest.raises(RecordError, match="SYNC on the main stream") as e:
        next(r.events())
    assert e.value.code is ErrorCode.ORDER


def test_the_single_connection_header_and_manifest_bytes_are_unchanged() -> None:
    assert b"channels" not in header(1).to_json()
    assert StreamHeader.from_json(header(3).to_json()).channels == 3
    with pytest.raises(ValueError, match="channels 17"):
        header(17)


def test_a_channel_hello_is_checked_field_by_field() -> None:
    good = ChannelHello("m1", "c" * 32, 2, 4)
    assert ChannelHello.from_json(good.to_json()) == good
    for bad, what in ((b'{"migration_id":"m","challenge":"c","channel":5,"channels":4}',
                       "channel 5"),
                      (b'{"migration_id":"m","challenge":"c","channel":1,"channels":1}',
                       "channels 1"),
                      (b'[1]', "object")):
        with pytest.raises(ValueError, match=what):
            ChannelHello.from_json(bad)


def test_a_gather_reports_a_channel_that_stays_silent() -> None:
    ram = GuestRam(PS, REGIONS, [bytearray(PAGES * PS)], writable=True)
    pairs = [loopback_pair(), loopback_pair()]
    g = ChannelGather([ChannelReader(i, d, ram, offset=0) for i, (_, d) in
                       enumerate(pairs, 1)], timeout_s=0.3)
    pairs[0][0].send_buffers([pack_header(RecordType.SYNC, 1, 0, 1, 1)])
    # the gather's own 0.3 s timeout ended the wait, naming the silent channel
    with pytest.raises(TransportError, match="RAM channel.* 2: pass 1 not complete, "
                                             "nothing received for 0.3 s"):
        g.barrier(1)
    g.stop()
    assert np.frombuffer(ram.locate(0, 1)[1], dtype=np.uint8).sum() == 0
