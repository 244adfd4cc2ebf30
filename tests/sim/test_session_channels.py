"""Migrations over RAM channels (docs/protocol.md §12) on the simulated backend: data
equality after a single and a multi-pass migration whose workload re-dirties pages
across passes (with one destination channel held back: without the pass barrier in
``transport/channel_receive.py`` that test fails on the content digests, checked by
disabling it), a channel lost mid-pass (rollback, the channel named), a stranger refused
as a channel, and the fall back to one connection against a destination that offers
none."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.session_rig import (
    MiB,
    Side,
    SideContainer,
    add_workload,
    assert_migrated,
    assert_rolled_back,
    dial,
    migrate,
    pair,
    spec,
    with_channels,
)
from vfiod.kernel.sim.workload import DmaTarget
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import SessionConfig
from vfiod.migration.session.dest import DestinationSession
from vfiod.migration.session.source import SourceSession
from vfiod.migration.stream.channel_hello import ChannelHello
from vfiod.migration.transport import Listener, connect
from vfiod.migration.transport.tcp import Connection
from vfiod.vfio import RamRegion

DEV = spec("v2_precopy_log")


@pytest.fixture
def sides(tmp_path: Path) -> Iterator[Any]:
    made: list[Side] = []

    def make(ram_mib: int = 16, **kw: Any) -> tuple[Side, Side]:
        s, d = pair(tmp_path, [SideContainer([DEV])],
                    ram=(RamRegion("ram", 0, ram_mib * MiB),), **kw)
        made.extend((s, d))
        return s, d
    yield make
    for side in made:
        side.close()


@pytest.fixture
def channel_port() -> Iterator[Listener]:
    """Where the destination accepts its channels (the daemon: its migration port)."""
    with Listener("127.0.0.1", 0) as lst:
        yield lst


def test_a_migration_over_two_channels_arrives_equal(sides, channel_port) -> None:
    src, dst = sides(fill_bytes=8 * MiB)
    run = migrate(src, dst, SessionConfig(channels=2), **with_channels(channel_port))
    assert_migrated(src, dst, run)
    assert run.source.timings["channels"] == 2
    assert run.dest is not None and run.dest.timings["channels"] == 2
    assert run.dest.verification["manifest"]["ram_bytes"] >= 8 * MiB


def test_pages_dirtied_again_across_passes_arrive_in_their_last_version(
        sides, channel_port) -> None:
    """A workload keeps writing a window of RAM while 3 channels carry at least 3 passes:
    each pass re-sends pages the one before sent, on whichever channel comes next. The
    pass barrier keeps every older copy from landing over a newer one; the content
    digests and the full RAM digest check it."""
    src, dst = sides(32, fill_bytes=16 * MiB)
    wl = add_workload(src, [DmaTarget(DEV.name, 0, 8 * MiB)], dirty_rate_bps=40e6,
                      hot_fraction=1.0, seed=11)
    wl.start()
    wl.wait_for_writes(2)
    cfg = SessionConfig(channels=3, slice_bytes=2 * MiB, record_bytes=256 * 1024,
                        batch_bytes=512 * 1024,
                        policy=Policy(downtime_limit_s=1e-6, max_iterations=4,
                                      on_timeout="force"))
    run = migrate(src, dst, cfg, **with_channels(channel_port))
    assert_migrated(src, dst, run)
    assert run.source.iterations >= 3
    assert all(p.ram_sent_bytes > 0 for p in run.source.history[1:])   # re-sent pages


class Lagging:
    """The destination's channels, the second accepted held back: before each read of at
    most 64 KiB it waits until the others have read 3 more times, or for 20 ms (they may
    be waiting at a barrier). Without the pass barrier the others run a pass ahead."""

    def __init__(self, accept: Any) -> None:
        self.accept_raw = accept
        self.cv = threading.Condition()
        self.fast_reads = 0
        self.accepted = 0

    def accept(self, timeout: float) -> Any:
        conn = self.accept_raw(timeout)
        self.accepted += 1
        return _LaggingEnd(self, conn, slow=self.accepted == 2)


class _LaggingEnd:
    def __init__(self, lag: Lagging, conn: Connection, slow: bool) -> None:
        self.lag, self.conn, self.slow = lag, conn, slow

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    def recv_into(self, view: memoryview) -> int:
        lag = self.lag
        if not self.slow:
            n = self.conn.recv_into(view)
            with lag.cv:
                lag.fast_reads += 1
                lag.cv.notify_all()
            return n
        with lag.cv:
            seen = lag.fast_reads
            lag.cv.wait_for(lambda: lag.fast_reads >= seen + 3, timeout=0.02)
        return self.conn.recv_into(view[:65536])


def test_a_lagging_channel_never_lands_an_older_copy_over_a_newer_one(
        sides, channel_port) -> None:
    """As above, with the destination's second channel held back behind the others:
    without the pass barrier its pass-k copies of pages land after the others' pass-k+1
    copies of the same pages, and the digests refuse the migration."""
    src, dst = sides(16, fill_bytes=4 * MiB)
    wl = add_workload(src, [DmaTarget(DEV.name, 0, 2 * MiB)], dirty_rate_bps=40e6,
                      hot_fraction=1.0, seed=5)
    wl.start()
    wl.wait_for_writes(2)
    cfg = SessionConfig(channels=3, slice_bytes=1 * MiB, record_bytes=64 * 1024,
                        batch_bytes=64 * 1024,
                        policy=Policy(downtime_limit_s=1e-6, max_iterations=6,
                                      on_timeout="force"))
    kw = with_channels(channel_port)
    lag = Lagging(lambda timeout: channel_port.accept(timeout))

    def on_dest(d: DestinationSession) -> None:
        d.channel_acceptor = lag.accept
    kw["on_dest"] = on_dest
    run = migrate(src, dst, cfg, **kw)
    assert_migrated(src, dst, run)
    assert run.source.iterations >= 3


class CutAfter:
    """A channel connection that goes away at its ``n``-th send."""

    def __init__(self, conn: Connection, n: int) -> None:
        self.conn, self.n = conn, n

    def send_buffers(self, buffers: Sequence[Any]) -> None:
        self.n -= 1
        if self.n == 0:
            self.conn.shutdown()
        self.conn.send_buffers(buffers)

    def shutdown(self) -> None:
        self.conn.shutdown()

    def close(self) -> None:
        self.conn.close()


def test_a_channel_lost_mid_pass_rolls_back_and_names_it(sides, channel_port) -> None:
    src, dst = sides(fill_bytes=8 * MiB)
    before = src.ram_digest()
    dialer = dial(channel_port)

    def cut_second(i: int, n: int) -> Any:
        conn = dialer(i, n)
        return CutAfter(conn, 3) if i == 2 else conn     # its hello, a batch, then gone

    cfg = SessionConfig(channels=2, slice_bytes=1 * MiB, batch_bytes=256 * 1024,
                        record_bytes=256 * 1024)
    run = migrate(src, dst, cfg, **with_channels(channel_port, cut_second))
    assert_rolled_back(src, dst, run, before)
    assert run.source.result == "failed"
    assert "RAM channel" in run.source.reason, run.source.reason
    assert run.dest is not None and "RAM channel" in run.dest.reason, run.dest.reason


def test_a_stranger_on_the_channel_port_is_refused(sides, channel_port) -> None:
    """Before the real channels, one connects with the right migration id but without
    this connection's challenge (a recorded or guessed opening): it is closed and the
    migration goes on over the real ones."""
    src, dst = sides(fill_bytes=4 * MiB)
    dialer = dial(channel_port)
    strangers: list[Connection] = []

    def stranger_first(i: int, n: int) -> Any:
        if i == 1:
            s = connect("127.0.0.1", channel_port.address[1], timeout=10)
            mid = run_ids["id"]
            s.send_buffers(ChannelHello(mid, "0" * 32, 1, 2).opening())
            strangers.append(s)
        return dialer(i, n)

    run_ids: dict[str, str] = {}

    def on_source(s: SourceSession) -> None:
        run_ids["id"] = s.migration_id
        s.channel_dialer = stranger_first

    kw = with_channels(channel_port)
    kw["on_source"] = on_source
    run = migrate(src, dst, SessionConfig(channels=2), **kw)
    assert_migrated(src, dst, run)
    assert run.dest is not None
    refused = [w for w in run.dest.warnings if "channel connection" in w]
    assert len(refused) == 1 and "does not answer this migration's challenge" in refused[0]
    assert strangers[0].recv_into(memoryview(bytearray(1))) == 0    # closed on it
    strangers[0].close()


def test_a_destination_without_channels_gets_the_single_connection_stream(
        sides, channel_port) -> None:
    src, dst = sides(fill_bytes=4 * MiB)
    dialed: list[int] = []

    def on_source(s: SourceSession) -> None:
        s.channel_dialer = lambda i, n: dialed.append(i) or dial(channel_port)(i, n)

    run = migrate(src, dst, SessionConfig(channels=4), on_source=on_source)
    assert_migrated(src, dst, run)
    assert dialed == []
    assert run.source.timings["channels"] == 1
