"""TCP transport on loopback: stream + return path, timeouts, peers that go away."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from vfiod.errors import KernelError
from vfiod.kernel.linux import socket_unsent_bytes
from vfiod.migration.stream import (
    Complete,
    DeviceInfo,
    ErrorCode,
    GuestRam,
    RecordError,
    StreamHeader,
    StreamReader,
    StreamWriter,
)
from vfiod.migration.stream.crc32c import crc32c
from vfiod.migration.transport import (
    Connection,
    ControlMessage,
    ControlType,
    Listener,
    TransportCode,
    TransportError,
    connect,
)
from vfiod.migration.transport.control import AckStage, ControlParser
from vfiod.vfio import RamRegion

PS = 4096
REGIONS = (RamRegion("ram", 0, 256 * PS),)
DEVICES = (DeviceInfo("dev0", "v2", 7),)
HEADER = StreamHeader("src", "m", "g", PS, REGIONS, DEVICES)
JOIN = 30.0


class Peer:
    """Run ``fn(conn)`` on an accepted connection in a thread; keep its result or error."""

    def __init__(self, fn: Callable[[Connection], Any], **listen: Any) -> None:
        self.listener = Listener("127.0.0.1", 0, **listen)
        self.result: Any = None
        self.error: BaseException | None = None
        self._fn = fn
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @property
    def port(self) -> int:
        return self.listener.address[1]

    def _run(self) -> None:
        try:
            with self.listener.accept(timeout=JOIN) as conn:
                self.result = self._fn(conn)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e
        finally:
            self.listener.close()

    def join(self) -> Any:
        self._t.join(JOIN)
        assert not self._t.is_alive(), "peer thread did not finish"
        return self.result


def memory(seed: int) -> bytearray:
    return bytearray(np.random.default_rng(seed).integers(0, 256, REGIONS[0].size,
                                                          dtype=np.uint8).tobytes())


def destination(conn: Connection) -> bytearray:
    r = StreamReader(conn)
    h = r.read_header()
    dst = bytearray(h.regions[0].size)
    r.attach_ram(GuestRam(PS, h.regions, [dst], writable=True))
    conn.send_control(ControlMessage.ack(AckStage.HEADER))
    for ev in r.events():
        if isinstance(ev, Complete):
            digests = conn.wait_control(ControlType.DIGESTS, JOIN)   # the commit
            conn.send_control(ControlMessage.ack(AckStage.RESUMED, r.records,
                                                 regions=digests.fields["regions"]))
    return dst


def test_migrate_over_loopback_with_acknowledgements() -> None:
    src = memory(1)
    peer = Peer(destination)
    with connect("127.0.0.1", peer.port, timeout=5) as conn:
        w = StreamWriter(conn, HEADER, GuestRam(PS, REGIONS, [src]), record_bytes=16 * PS,
                         batch_bytes=64 * PS)
        w.start()
        ack = conn.wait_ack(AckStage.HEADER, timeout=JOIN)
        assert ack.stage is AckStage.HEADER and ack.fields == {"value": 0}
        w.send_ram([(0, 256)], quiescent=False)
        w.send_device_data("dev0", b"state" * 1000)
        w.end_of_state("dev0")
        w.finish()
        regions = [{"name": "ram", "pages": 256, "digest": "ab" * 16}]
        commit = ControlMessage.digests(w.records_sent, regions)
        conn.send_control(commit)
        done = conn.wait_ack(AckStage.RESUMED, timeout=JOIN)
        assert done.fields == {"value": w.records_sent, "regions": regions}
        assert conn.bytes_sent == w.bytes_sent + len(commit.encode())
    assert peer.join() == src and peer.error is None


def test_destination_cancel_reaches_the_source() -> None:
    def cancelling(conn: Connection) -> None:
        r = StreamReader(conn)
        r.read_header()
        conn.send_control(ControlMessage.cancel("operator said no"))
        # keep reading until the source stops, so its sends do not fail first
        try:
            while conn.recv_into(memoryview(bytearray(65536))):
                pass
        except TransportError:
            pass

    peer = Peer(cancelling)
    with connect("127.0.0.1", peer.port) as conn:
        w = StreamWriter(conn, HEADER, GuestRam(PS, REGIONS, [memory(2)]), record_bytes=PS,
                         batch_bytes=PS)
        with pytest.raises(TransportError) as ei:
            w.start()
            for _ in range(10_000):  # each batch ends with check_peer()
                w.send_ram([(0, 1)], quiescent=True)
        assert ei.value.code == TransportCode.PEER_CANCELLED
        assert "operator said no" in str(ei.value)
        w.abort("cancelled by the destination")
    peer.join()


def test_destination_error_is_raised_with_its_fields() -> None:
    def failing(conn: Connection) -> None:
        conn.send_control(ControlMessage.error(ErrorCode.PAYLOAD_CHECKSUM.value,
                                               "record 7 bad", record=7))

    peer = Peer(failing)
    with connect("127.0.0.1", peer.port) as conn:
        with pytest.raises(TransportError) as ei:
            conn.wait_ack(AckStage.RESUMED, timeout=JOIN)
        assert ei.value.code == TransportCode.PEER_ERROR
        assert ei.value.remote == {"code": "payload-checksum", "message": "record 7 bad",
                                   "record": 7}
    peer.join()


def test_wait_ack_times_out_and_notices_a_closed_peer() -> None:
    gate = threading.Event()
    peer = Peer(lambda conn: gate.wait(JOIN))
    with connect("127.0.0.1", peer.port) as conn:
        with pytest.raises(TransportError) as ei:
            conn.wait_ack(AckStage.RESUMED, timeout=0.2)
        assert ei.value.code == TransportCode.TIMEOUT
        gate.set()
        peer.join()  # the peer closes its end
        with pytest.raises(TransportError) as ei:
            conn.wait_ack(AckStage.RESUMED, timeout=JOIN)
        assert ei.value.code == TransportCode.PEER_CLOSED
        assert "before sending its 'resumed' acknowledgement" in str(ei.value)


def test_source_closing_mid_stream_is_a_located_truncation() -> None:
    def reading(conn: Connection) -> None:
        r = StreamReader(conn)
        h = r.read_header()
        r.attach_ram(GuestRam(PS, h.regions, [bytearray(h.regions[0].size)], writable=True))
        for _ in r.events():
            pass

    peer = Peer(reading)
    conn = connect("127.0.0.1", peer.port)
    w = StreamWriter(conn, HEADER, GuestRam(PS, REGIONS, [memory(3)]))
    w.start()
    w.send_ram([(0, 4)], quiescent=True)
    conn.send_buffers([b"\x02\x00"])  # the first bytes of a record header, then gone
    conn.close()
    peer.join()
    assert isinstance(peer.error, RecordError)
    assert peer.error.code == ErrorCode.TRUNCATED and peer.error.record == 2


def test_destination_closing_mid_stream_fails_the_source_sends() -> None:
    peer = Peer(lambda conn: StreamReader(conn).read_header())
    with connect("127.0.0.1", peer.port) as conn:
        w = StreamWriter(conn, HEADER, GuestRam(PS, REGIONS, [memory(4)]), record_bytes=PS,
                         batch_bytes=PS)
        with pytest.raises(TransportError) as ei:
            w.start()
            peer.join()
            for _ in range(100_000):
                w.send_ram([(0, 1)], quiescent=True)
        assert ei.value.code == TransportCode.PEER_CLOSED


def test_io_timeout_when_the_peer_goes_silent() -> None:
    gate = threading.Event()
    peer = Peer(lambda conn: gate.wait(JOIN))
    with connect("127.0.0.1", peer.port, io_timeout=0.2) as conn:
        with pytest.raises(TransportError) as ei:
            StreamReader(conn).read_header()
        assert ei.value.code == TransportCode.TIMEOUT
    gate.set()
    peer.join()


def test_accept_timeout() -> None:
    with Listener("127.0.0.1", 0) as lst:
        with pytest.raises(TransportError) as ei:
            lst.accept(timeout=0.1)
        assert ei.value.code == TransportCode.ACCEPT_TIMEOUT
        assert "no source connected within 0.1 s" in str(ei.value)


def test_connect_refused() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    with pytest.raises(TransportError) as ei:
        connect("127.0.0.1", port, timeout=5)
    assert ei.value.code == TransportCode.CONNECT
    assert "ECONNREFUSED" in str(ei.value) and ei.value.peer == f"127.0.0.1:{port}"


def test_connect_timeout_against_a_full_accept_queue() -> None:
    # A listener that never accepts: once its queue is full, Linux drops further SYNs.
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    held = []
    try:
        with pytest.raises(TransportError) as ei:
            for _ in range(8):
                held.append(connect("127.0.0.1", lst.getsockname()[1], timeout=0.3))
        assert ei.value.code == TransportCode.CONNECT_TIMEOUT
    finally:
        for c in held:
            c.close()
        lst.close()


def test_control_frames_round_trip_in_pieces_and_refuse_corruption() -> None:
    msgs = [ControlMessage.ack(AckStage.HEADER), ControlMessage.cancel("x" * 100),
            ControlMessage.error("EIO", "boom", 3),
            ControlMessage.digests(9, [{"name": "ram", "pages": 2, "digest": "00ff"}])]
    blob = b"".join(m.encode() for m in msgs)
    p = ControlParser("peer")
    got = []
    for i in range(0, len(blob), 7):
        got += p.feed(blob[i:i + 7])
    assert got == msgs and got[1].kind == ControlType.CANCEL
    assert got[0].stage is AckStage.HEADER and got[3].kind is ControlType.DIGESTS
    for i in range(len(msgs[0].encode())):
        bad = bytearray(msgs[0].encode())
        bad[i] ^= 0xFF
        with pytest.raises(TransportError) as ei:
            ControlParser("peer").feed(bytes(bad))
        assert ei.value.code == TransportCode.CONTROL
    head = b"VFCT" + (1).to_bytes(2, "little") + b"\0\0" + (1 << 20).to_bytes(4, "little")
    head += b"\0" * 4
    head += crc32c(head).to_bytes(4, "little")
    with pytest.raises(TransportError, match="over 65536"):
        ControlParser("peer").feed(head)


def _frame(kind: int, payload: bytes) -> bytes:
    head = (b"VFCT" + kind.to_bytes(2, "little") + b"\0\0" + len(payload).to_bytes(4, "little")
            + crc32c(payload).to_bytes(4, "little"))
    return head + crc32c(head).to_bytes(4, "little") + payload


@pytest.mark.parametrize("payload,refusal", [
    (b'{"stage":"complete","value":1}', "unknown acknowledgement stage 'complete'"),
    (b'{"stage":"verify","value":1}', "unknown acknowledgement stage 'verify'"),
    (b'{"value":1}', "unknown acknowledgement stage None"),
])
def test_an_ack_with_a_stage_this_vfiod_never_sends_is_refused(payload: bytes,
                                                                refusal: str) -> None:
    with pytest.raises(TransportError, match=refusal) as ei:
        ControlParser("peer").feed(_frame(ControlType.ACK, payload))
    assert ei.value.code == TransportCode.CONTROL
    [ok] = ControlParser("peer").feed(_frame(ControlType.ACK, b'{"stage":"resumed"}'))
    assert ok == ControlMessage(ControlType.ACK, {}, AckStage.RESUMED)


def test_only_an_ack_carries_a_stage() -> None:
    with pytest.raises(TransportError, match="DIGESTS frame carries a stage"):
        ControlParser("peer").feed(_frame(ControlType.DIGESTS, b'{"stage":"header"}'))
    with pytest.raises(ValueError, match="every ACK has one"):
        ControlMessage(ControlType.ACK, {"value": 0})
    with pytest.raises(ValueError, match="a stage belongs to ACK alone"):
        ControlMessage(ControlType.CANCEL, {}, AckStage.HEADER)


def test_one_big_batch_survives_partial_sends() -> None:
    # 32 MiB in one send_buffers call, many views: the kernel takes it in pieces (the socket
    # has a timeout, so sendmsg returns short counts) and every byte must arrive in order.
    blob = np.random.default_rng(5).integers(0, 256, 32 << 20, dtype=np.uint8)
    views = [memoryview(blob)[i:i + (1 << 20) - 7] for i in range(0, 32 << 20, (1 << 20) - 7)]

    def drain(conn: Connection) -> bytes:
        out = bytearray(32 << 20)
        mv, got = memoryview(out), 0
        while got < len(out):
            n = conn.recv_into(mv[got:got + 65536])
            assert n
            got += n
        return bytes(out)

    peer = Peer(drain)
    with connect("127.0.0.1", peer.port) as conn:
        conn.send_buffers(views)
        assert conn.bytes_sent == 32 << 20
    assert peer.join() == blob.tobytes()


def test_an_unresolvable_host_is_named_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    # the resolver's EAI_NONAME (-2) must not be shown as an errno ("connect: -2")
    def no_such_host(*a: object, **k: object) -> socket.socket:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "create_connection", no_such_host)
    with pytest.raises(TransportError) as ei:
        connect("no-such-host.invalid", 4444)
    assert "cannot resolve the host: Name or service not known" in str(ei.value)
    assert "connect: -" not in str(ei.value)


def test_unsent_bytes_counts_what_a_blocked_reader_left_in_the_send_queue() -> None:
    received = threading.Event()
    peer = Peer(lambda conn: received.wait(JOIN))      # accepts, reads nothing yet
    with connect("127.0.0.1", peer.port) as conn:
        assert conn.unsent_bytes() == 0
        raw = socket.socket(fileno=os.dup(conn._sock.fileno()))
        raw.setblocking(False)
        sent = 0
        try:
            while True:                                 # until both buffers are full
                sent += raw.send(bytes(1 << 16))
        except BlockingIOError:
            pass
        finally:
            raw.close()
        queued = conn.unsent_bytes()
        assert 0 < queued <= sent
        received.set()
    peer.join()
    r, w = os.pipe()                                    # not a socket: a clear error
    try:
        with pytest.raises(KernelError, match="SIOCOUTQ"):
            socket_unsent_bytes(r)
    finally:
        os.close(r)
        os.close(w)
