"""The fault proxy's connections (``fault_proxy.py``): the faults, the protocol points,
what a test plans for a connection, and ``Link``, one proxied connection with its two
``Direction``s, which reads the frames as they pass (docs/protocol.md §8.1-§8.2: a
20-byte header with the payload length, then a JSON payload, read with vfiod's
``ControlParser``), reaches the plan's point and applies its fault. The proxy's thread
owns every ``Link``: nothing here takes a lock.
"""

from __future__ import annotations

import enum
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vfiod.migration.stream.records import (
    RAM_LIVE,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RecordType,
)
from vfiod.migration.transport.control import (
    CONTROL_MAGIC,
    FRAME_HEADER_SIZE,
    MAX_CONTROL_PAYLOAD,
    AckStage,
    ControlMessage,
    ControlParser,
    ControlType,
    TransportError,
)


class Fault(enum.Enum):
    CUT = "cut"
    STALL = "stall"
    DELAY = "delay"
    DROP_BYTES = "drop-bytes"
    DROP_RETURN = "drop-return-path"


class Point(enum.Enum):
    SETUP = "setup"
    PRECOPY = "pre-copy"
    STOPCOPY = "stop-and-copy"
    PREPARED = "after-prepared"
    PREPARED_SWALLOWED = "prepared-swallowed"
    COMMIT = "after-commit"
    RESUMED = "after-resumed"
    RESUMED_SWALLOWED = "resumed-swallowed"


_ACK_POINTS = {AckStage.PREPARED: (Point.PREPARED, Point.PREPARED_SWALLOWED),
               AckStage.RESUMED: (Point.RESUMED, Point.RESUMED_SWALLOWED)}


@dataclass(frozen=True)
class FaultPlan:
    """What to do to the next connection: ``fault`` at ``point`` (None: only when
    triggered); ``on_fire`` runs on the proxy's thread right after the fault applied."""

    fault: Fault | None
    point: Point | None = None
    precopy_bytes: int = 256 * 1024
    delay_s: float = 0.2
    drop_bytes: int = 1024
    drop_forward: bool = True        # drop-bytes: source → destination (else the return)
    record: bool = False             # keep the forward bytes (``Link.recorded``)
    on_fire: Callable[[], None] | None = None


@dataclass
class _Chunk:
    due: float
    data: memoryview
    then: Callable[[], None] | None = None


class _Frames:
    """Whole control frames out of a byte stream; after a frame the parser refuses, the
    rest passes through unread (``broken`` says why)."""

    def __init__(self, label: str) -> None:
        self.buf = bytearray()
        self.parser = ControlParser(label)
        self.broken: str | None = None

    def feed(self, data: bytes) -> tuple[list[tuple[bytes, ControlMessage]], bytes]:
        if self.broken is not None:
            return [], data
        self.buf += data
        out: list[tuple[bytes, ControlMessage]] = []
        while len(self.buf) >= FRAME_HEADER_SIZE:
            length = int.from_bytes(self.buf[8:12], "little")
            if self.buf[:4] != CONTROL_MAGIC or length > MAX_CONTROL_PAYLOAD:
                self.broken = f"not a control frame: {bytes(self.buf[:FRAME_HEADER_SIZE]).hex()}"
                break
            end = FRAME_HEADER_SIZE + length
            if len(self.buf) < end:
                return out, b""
            frame = bytes(self.buf[:end])
            try:
                msg = self.parser.feed(frame)[0]
            except TransportError as e:
                self.broken = str(e)
                break
            del self.buf[:end]
            out.append((frame, msg))
        rest = bytes(self.buf) if self.broken is not None else b""
        if rest:
            self.buf.clear()
        return out, rest


class _StopCopyScan:
    """Record headers of the forward stream after ACK header (a record boundary: the
    source sends nothing between its HEADER and that ACK), skipping payloads by their
    length, until the first record a source sends only once its guest paused (docs/protocol.md
    §6, §9.1): a RAM record without ``RAM_LIVE``, an END_OF_STATE or the MANIFEST."""

    _PAUSED_TYPES = (RecordType.END_OF_STATE, RecordType.MANIFEST)

    def __init__(self) -> None:
        self.head = bytearray()
        self.skip = 0
        self.found = False

    def find(self, data: bytes) -> int | None:
        """Where in ``data`` that record starts (0 when its header began in an earlier
        chunk), or None."""
        i = 0
        while i < len(data) and not self.found:
            if self.skip:
                k = min(self.skip, len(data) - i)
                self.skip -= k
                i += k
                continue
            take = data[i:i + RECORD_HEADER_SIZE - len(self.head)]
            self.head += take
            i += len(take)
            if len(self.head) < RECORD_HEADER_SIZE:
                return None
            rtype, flags, _, length = RECORD_HEADER.unpack_from(self.head)[:4]
            self.head.clear()
            if rtype in self._PAUSED_TYPES or (rtype == RecordType.RAM
                                               and not flags & RAM_LIVE):
                self.found = True
                return max(0, i - RECORD_HEADER_SIZE)
            self.skip = length
        return None


class Direction:
    """One way of a connection: what was read, queued, sent and dropped."""

    def __init__(self, name: str, src: socket.socket, dst: socket.socket) -> None:
        self.name, self.src, self.dst = name, src, dst
        self.queue: deque[_Chunk] = deque()
        self.queued = self.received = self.sent = self.dropped = 0
        self.eof = self.shut = False
        self.drop = 0                  # bytes still to discard
        self.discard = False           # discard everything from now on
        self.frames: _Frames | None = None
        self.tokens, self.stamp = 0.0, time.monotonic()


class Link:
    """One proxied connection; ``seen`` lists the frames recognised, in order."""

    def __init__(self, client: socket.socket, upstream: socket.socket, plan: FaultPlan | None,
                 *, on_close: Callable[[Link], None], on_fired: Callable[[], None]) -> None:
        """``on_close``: the proxy lets go of its sockets; ``on_fired``: the plan fired."""
        self.on_close, self.on_fired = on_close, on_fired
        self.fwd = Direction("forward", client, upstream)
        self.ret = Direction("return", upstream, client)
        self.ret.frames = _Frames("fault proxy return path")
        self.plan = plan
        self.stalled = self.closed = self.fired = False
        self.delay = 0.0
        self.after_header: int | None = None   # forward bytes since ACK header
        self.stop_copy = _StopCopyScan()
        #: bytes read after a point was reached and before its fault applied (the queue
        #: ahead of the point drains first): emitted under the fault
        self.held: list[tuple[Direction, bytes]] | None = None
        self.seen: list[str] = []
        self.recorded = bytearray()

    def sockets(self) -> tuple[socket.socket, socket.socket]:
        return self.fwd.src, self.fwd.dst

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.on_close(self)

    def ingest(self, d: Direction, data: bytes) -> None:
        """Bytes read from ``d``'s source: recognise the points, queue what goes on."""
        d.received += len(data)
        if d is self.fwd and self.plan is not None and self.plan.record:
            self.recorded += data
        if d.frames is not None:
            frames, rest = d.frames.feed(data)
            for frame, msg in frames:
                self._frame(d, frame, msg)
            if rest:
                self.emit(d, rest)
        else:
            self._stream(data)

    def _stream(self, data: bytes) -> None:
        plan, n = self.plan, self.after_header
        k: int | None = None
        if plan is not None and n is not None:
            if plan.point is Point.PRECOPY and n < plan.precopy_bytes <= n + len(data):
                k = plan.precopy_bytes - n
            elif plan.point is Point.STOPCOPY:
                k = self.stop_copy.find(data)
        if k is not None:
            self.emit(self.fwd, data[:k])
            self._reach(self.fwd)
            self.emit(self.fwd, data[k:])
        else:
            self.emit(self.fwd, data)
        if n is not None:
            self.after_header = n + len(data)

    def _frame(self, d: Direction, frame: bytes, msg: ControlMessage) -> None:
        name = msg.stage.value if msg.stage is not None else msg.kind.name
        self.seen.append(f"{d.name} {name}")
        point = self.plan.point if self.plan is not None else None
        if msg.stage is AckStage.HEADER:
            if point is Point.SETUP:
                self._reach(d)        # before it passes: the fault applies to it
            self.emit(d, frame)
            self.after_header = 0
        elif msg.stage in _ACK_POINTS:
            if msg.stage is AckStage.PREPARED:
                self.fwd.frames = _Frames("fault proxy forward path")
            forwarded, swallowed = _ACK_POINTS[msg.stage]
            if point is not swallowed:
                self.emit(d, frame)
            if point in (forwarded, swallowed):
                self._reach(d)
        else:
            self.emit(d, frame)
            if msg.kind is ControlType.COMMIT and point is Point.COMMIT:
                self._reach(d)

    def _reach(self, d: Direction) -> None:
        """The plan's point: fire once what ``d`` queued before it has been written;
        whatever is read meanwhile waits and then goes under the fault."""
        def at_point() -> None:
            held, self.held = self.held or [], None
            self.fire()
            for hd, data in held:
                self.emit(hd, data)
        d.queue.append(_Chunk(time.monotonic() + self.delay, memoryview(b""), at_point))
        self.held = []

    def emit(self, d: Direction, data: bytes) -> None:
        if self.held is not None:
            self.held.append((d, data))
            return
        if self.closed or d.discard:
            d.dropped += len(data)
            return
        if d.drop:
            n = min(d.drop, len(data))
            d.drop -= n
            d.dropped += n
            data = data[n:]
        if data:
            d.queue.append(_Chunk(time.monotonic() + self.delay, memoryview(data)))
            d.queued += len(data)

    def fire(self) -> None:
        if self.fired or self.plan is None:
            return
        self.fired = True
        if self.plan.fault is not None:
            self.apply(self.plan.fault)
        if self.plan.on_fire is not None:
            self.plan.on_fire()
        self.on_fired()

    def apply(self, fault: Fault) -> None:
        plan = self.plan or FaultPlan(fault)
        if fault is Fault.CUT:
            self.close()
        elif fault is Fault.STALL:
            self.stalled = True
        elif fault is Fault.DELAY:
            self.delay = plan.delay_s
        elif fault is Fault.DROP_BYTES:
            (self.fwd if plan.drop_forward else self.ret).drop = plan.drop_bytes
        elif fault is Fault.DROP_RETURN:
            self.ret.discard = True
