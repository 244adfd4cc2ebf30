"""The fault matrix's proxy (tests/support/fault_proxy.py) on a plain socket pair: each
fault does what it says, each protocol point fires where it should, and the frame magic
inside stream data is not mistaken for a frame (docs/protocol.md §8)."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.support.fault_link import Fault, FaultPlan, Point
from tests.support.fault_proxy import FaultProxy
from vfiod.migration.transport.control import AckStage, ControlMessage

OFFER, HELLO, HEADER = (ControlMessage.ack(s).encode()
                        for s in (AckStage.OFFER, AckStage.HELLO, AckStage.HEADER))
PREPARED = ControlMessage.ack(AckStage.PREPARED).encode()
RESUMED = ControlMessage.ack(AckStage.RESUMED).encode()
COMMIT = ControlMessage.commit("m1", "c1").encode()
REPORT = ControlMessage.report(0.1, 0.2, 0.5).encode()


@contextmanager
def proxied(plan: FaultPlan | None = None, rate_bps: float | None = None
            ) -> Iterator[tuple[FaultProxy, socket.socket, socket.socket]]:
    """(proxy, source end, destination end) of one connection through a proxy."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    proxy = FaultProxy(server.getsockname()[:2], plan, rate_bps=rate_bps)
    host, port = proxy.address.rsplit(":", 1)
    src = socket.create_connection((host, int(port)), timeout=10)
    try:
        dst, _ = server.accept()
        dst.settimeout(10)
        try:
            yield proxy, src, dst
        finally:
            dst.close()
    finally:
        src.close()
        server.close()
        proxy.close()


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, f"closed after {len(out)} of {n} bytes"
        out += chunk
    return out


def recv_to_end(s: socket.socket) -> bytes:
    """Everything until the other side closes (a reset counts as closing)."""
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def quiet(s: socket.socket) -> bool:
    """Nothing to read and no end of stream (after ``proxy.sync()``)."""
    return not select.select([s], [], [], 0)[0]


def test_forwards_both_ways_and_passes_the_end() -> None:
    with proxied() as (proxy, src, dst):
        data = bytes(range(256)) * 4096
        src.sendall(data)
        assert recv_exactly(dst, len(data)) == data
        dst.sendall(OFFER + HELLO)
        assert recv_exactly(src, len(OFFER + HELLO)) == OFFER + HELLO
        src.shutdown(socket.SHUT_WR)
        assert dst.recv(1) == b""
        assert proxy.link.seen == ["return offer", "return hello"]
        assert not proxy.fired.is_set()


def test_cut_closes_both_sides() -> None:
    with proxied(FaultPlan(Fault.CUT)) as (proxy, src, dst):
        src.sendall(b"before")
        assert recv_exactly(dst, 6) == b"before"
        proxy.trigger()
        assert recv_to_end(dst) == b"" and recv_to_end(src) == b""


def test_stall_forwards_nothing_and_keeps_both_open() -> None:
    with proxied(FaultPlan(Fault.STALL)) as (proxy, src, dst):
        proxy.trigger()
        proxy.wait_fired(10)
        src.sendall(b"x" * 1000)
        dst.sendall(b"y" * 1000)
        proxy.sync()
        assert quiet(dst) and quiet(src)


def test_delay_adds_latency_to_each_chunk() -> None:
    with proxied(FaultPlan(Fault.DELAY, delay_s=0.3)) as (proxy, src, dst):
        proxy.trigger()
        proxy.wait_fired(10)
        for a, b, data in ((src, dst, b"ping"), (dst, src, HEADER)):  # the return path
            t0 = time.monotonic()                                    # carries frames
            a.sendall(data)
            assert recv_exactly(b, len(data)) == data
            assert time.monotonic() - t0 >= 0.3


@pytest.mark.parametrize("forward", [True, False])
def test_drop_bytes_discards_that_many_in_one_direction(forward: bool) -> None:
    with proxied(FaultPlan(Fault.DROP_BYTES, drop_bytes=50, drop_forward=forward)) as (
            proxy, src, dst):
        proxy.trigger()
        proxy.wait_fired(10)
        a, b = (src, dst) if forward else (dst, src)
        frames = OFFER + HELLO + HEADER           # the return path's language
        a.sendall(frames)
        assert recv_exactly(b, len(frames) - 50) == frames[50:]
        a.sendall(OFFER)                          # only the first 50 bytes go
        assert recv_exactly(b, len(OFFER)) == OFFER
        b.sendall(HELLO)                          # the other way is untouched
        assert recv_exactly(a, len(HELLO)) == HELLO


def test_drop_return_path_keeps_the_stream_flowing() -> None:
    with proxied(FaultPlan(Fault.DROP_RETURN)) as (proxy, src, dst):
        proxy.trigger()
        proxy.wait_fired(10)
        dst.sendall(HEADER)
        src.sendall(b"stream")
        assert recv_exactly(dst, 6) == b"stream"
        proxy.sync()
        assert quiet(src)
        assert proxy.link.ret.dropped == len(HEADER)


def test_rate_cap_bounds_throughput() -> None:
    with proxied(rate_bps=2 << 20) as (proxy, src, dst):
        data = b"r" * (1 << 20)
        t0 = time.monotonic()
        src.sendall(data)
        assert recv_exactly(dst, len(data)) == data
        # 1 MiB at 2 MiB/s, less the first burst (40 KiB)
        assert time.monotonic() - t0 >= 0.45


def test_setup_point_fires_as_the_header_ack_arrives() -> None:
    with proxied(FaultPlan(Fault.CUT, Point.SETUP)) as (proxy, src, dst):
        dst.sendall(OFFER + HELLO)
        assert recv_exactly(src, len(OFFER + HELLO)) == OFFER + HELLO
        src.sendall(b"HEADER record")
        assert recv_exactly(dst, 13) == b"HEADER record"
        assert not proxy.fired.is_set()
        dst.sendall(HEADER)
        assert recv_to_end(src) == b""                # the ACK header never passed
        assert proxy.link.seen == ["return offer", "return hello", "return header"]


def test_precopy_point_counts_stream_bytes_after_the_header_ack() -> None:
    with proxied(FaultPlan(Fault.CUT, Point.PRECOPY, precopy_bytes=1000)) as (
            proxy, src, dst):
        src.sendall(b"h" * 500)                       # before ACK header: not counted
        assert recv_exactly(dst, 500) == b"h" * 500
        dst.sendall(HEADER)
        assert recv_exactly(src, len(HEADER)) == HEADER
        src.sendall(b"r" * 3000)
        assert recv_to_end(dst) == b"r" * 1000


def test_a_point_reached_mid_stream_loses_nothing_after_it() -> None:
    """What arrives while the bytes before the point drain waits, then goes under the
    fault (here: delayed), all of it."""
    with proxied(FaultPlan(Fault.DELAY, Point.PRECOPY, precopy_bytes=1000, delay_s=0.1),
                 rate_bps=8 << 20) as (proxy, src, dst):
        dst.sendall(HEADER)
        recv_exactly(src, len(HEADER))
        data = bytes(range(256)) * 4096
        src.sendall(data)
        assert recv_exactly(dst, len(data)) == data
        assert proxy.fired.is_set() and proxy.link.fwd.dropped == 0


@pytest.mark.parametrize("point, passes", [(Point.PREPARED, True),
                                           (Point.PREPARED_SWALLOWED, False)])
def test_prepared_point_forwarded_or_swallowed(point: Point, passes: bool) -> None:
    with proxied(FaultPlan(Fault.STALL, point)) as (proxy, src, dst):
        dst.sendall(HEADER + PREPARED)
        got = recv_exactly(src, len(HEADER + PREPARED) if passes else len(HEADER))
        assert got == HEADER + PREPARED if passes else got == HEADER
        proxy.wait_fired(10)
        src.sendall(COMMIT)                           # stalled: the commit never arrives
        proxy.sync()
        assert quiet(dst) and quiet(src)
        assert proxy.link.seen == ["return header", "return prepared"]


def test_commit_point_forwards_the_commit_then_fires() -> None:
    fired = []
    plan = FaultPlan(Fault.CUT, Point.COMMIT, on_fire=lambda: fired.append(True))
    with proxied(plan) as (proxy, src, dst):
        dst.sendall(HEADER)
        recv_exactly(src, len(HEADER))
        src.sendall(b"RAM " + COMMIT + b" inside the stream is data")
        recv_exactly(dst, len(COMMIT) + 30)
        assert not proxy.fired.is_set()               # before PREPARED the stream is raw
        dst.sendall(PREPARED)
        recv_exactly(src, len(PREPARED))
        src.sendall(COMMIT + REPORT)
        assert recv_to_end(dst) == COMMIT             # the commit passed, then the cut
        proxy.wait_fired(10)
        assert fired == [True]
        # what the source sent, read by the proxy; the report went no further
        assert proxy.link.seen == ["return header", "return prepared", "forward COMMIT",
                                   "forward REPORT"]


@pytest.mark.parametrize("point, passes", [(Point.RESUMED, True),
                                           (Point.RESUMED_SWALLOWED, False)])
def test_resumed_point_forwarded_or_swallowed(point: Point, passes: bool) -> None:
    with proxied(FaultPlan(Fault.DROP_RETURN, point)) as (proxy, src, dst):
        dst.sendall(PREPARED)
        recv_exactly(src, len(PREPARED))
        src.sendall(COMMIT)
        recv_exactly(dst, len(COMMIT))
        dst.sendall(RESUMED + OFFER)                  # after the point: dropped
        if passes:
            assert recv_exactly(src, len(RESUMED)) == RESUMED
        proxy.wait_fired(10)
        src.sendall(REPORT)
        assert recv_exactly(dst, len(REPORT)) == REPORT
        proxy.sync()
        assert quiet(src)


def test_records_the_stream_and_later_connections_pass_clean() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    proxy = FaultProxy(server.getsockname()[:2], FaultPlan(Fault.CUT, Point.SETUP, record=True))
    host, port = proxy.address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as src, \
                server.accept()[0] as dst:
            src.sendall(b"offer and header")
            recv_exactly(dst, 16)
            dst.sendall(HEADER)
            assert recv_to_end(src) == b""
        assert bytes(proxy.link.recorded) == b"offer and header"
        with socket.create_connection((host, int(port)), timeout=10) as again, \
                server.accept()[0] as dst:
            dst.settimeout(10)
            dst.sendall(HEADER)                           # no plan: nothing fires
            assert recv_exactly(again, len(HEADER)) == HEADER
            again.sendall(b"clean")
            assert recv_exactly(dst, 5) == b"clean"
        assert len(proxy.links) == 2 and proxy.links[1].seen == ["return header"]
    finally:
        server.close()
        proxy.close()


def test_a_return_path_that_is_not_frames_passes_unread() -> None:
    with proxied(FaultPlan(Fault.CUT, Point.SETUP)) as (proxy, src, dst):
        dst.sendall(b"garbage, not a frame " * 3)
        assert recv_exactly(src, 63) == b"garbage, not a frame " * 3
        dst.sendall(HEADER)                           # unread now: no point fires
        assert recv_exactly(src, len(HEADER)) == HEADER
        assert not proxy.fired.is_set() and proxy.link.seen == []
