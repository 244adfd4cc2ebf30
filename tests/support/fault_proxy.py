"""A TCP proxy between a source vfiod and a destination's migration port that breaks the
connection on purpose, for the fault matrix (docs/architecture.md §1 steps 5-7; the frames
of docs/protocol.md §8).

    proxy = FaultProxy(("127.0.0.1", dst_port), FaultPlan(Fault.STALL, Point.PREPARED),
                       rate_bps=4 << 20)
    ... src migrates to proxy.address ...
    proxy.wait_fired(30); proxy.apply(Fault.CUT); proxy.close()

Faults (``Fault``): ``cut`` closes both sides; ``stall`` stops forwarding both ways and
keeps both open; ``delay`` adds ``delay_s`` of latency to every chunk; ``drop-bytes``
discards the next ``drop_bytes`` bytes of one direction (the stream is corrupted);
``drop-return-path`` discards everything the destination sends while the stream still
flows. ``rate_bps`` caps each direction of every connection, so that phases last long
enough to act in.

A fault fires on demand (``trigger``) or at a protocol point (``Point``) the proxy
recognises. The return path carries only control frames (docs/protocol.md §8.1: 20-byte
header with the payload length, JSON payload), split here and read with vfiod's
``ControlParser``; the forward path is the stream, whose bytes may contain the frame magic,
so it is read as frames only once the destination's ACK prepared went by (after it the
source sends frames alone: COMMIT, REPORT). Points: ``setup`` (the ACK header arrives; the
fault applies to it), ``pre-copy`` (``precopy_bytes`` forward bytes after ACK header),
``stop-and-copy`` (only on demand: the test triggers when the source's status says so),
ACK prepared forwarded or swallowed, COMMIT forwarded, ACK resumed forwarded or
swallowed. "Forwarded" means written to the other side before the fault applies.

Only the first connection gets the plan (the migration); later ones (the outcome queries
after a fault) are forwarded cleanly, as a network that healed would. Everything runs on
one thread around a selector; ``trigger``/``apply`` reach it through a queue and a wake-up
socket, and nothing waits by sleeping.
"""

from __future__ import annotations

import enum
import queue
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

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

HIGH_WATER = 256 * 1024          # a direction stops reading with this much queued
CHUNK = 64 * 1024


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

    def __init__(self, client: socket.socket, upstream: socket.socket,
                 plan: FaultPlan | None) -> None:
        self.fwd = Direction("forward", client, upstream)
        self.ret = Direction("return", upstream, client)
        self.ret.frames = _Frames("fault proxy return path")
        self.plan = plan
        self.stalled = self.closed = self.fired = False
        self.delay = 0.0
        self.after_header: int | None = None   # forward bytes since ACK header
        #: bytes read after a point was reached and before its fault applied (the queue
        #: ahead of the point drains first): emitted under the fault
        self.held: list[tuple[Direction, bytes]] | None = None
        self.seen: list[str] = []
        self.recorded = bytearray()

    def sockets(self) -> tuple[socket.socket, socket.socket]:
        return self.fwd.src, self.fwd.dst


class FaultProxy:
    def __init__(self, target: tuple[str, int], plan: FaultPlan | None = None, *,
                 rate_bps: float | None = None,
                 listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        """``plan``: what happens to the first connection (None: nothing, forward only)."""
        self.target, self.plan, self.rate = target, plan, rate_bps
        self._lsock = socket.create_server(listen)
        self._lsock.setblocking(False)
        self.address = "{}:{}".format(*self._lsock.getsockname()[:2])
        self.links: list[Link] = []
        self.fired = threading.Event()
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue[tuple[str, Fault | None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._lsock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._masks: dict[socket.socket, int] = {}
        self._syncs: deque[threading.Event] = deque()
        self._synced = 0
        self._closing = False
        self._thread = threading.Thread(target=self._main, name="fault-proxy", daemon=True)
        self._thread.start()

    # -- the test's side -------------------------------------------------------------------
    def trigger(self) -> None:
        """Fire the armed connection's plan now (the stop-and-copy point)."""
        self._command("fire", None)

    def apply(self, fault: Fault) -> None:
        """Apply ``fault`` to the armed connection now, whatever the plan says."""
        self._command("apply", fault)

    def sync(self, timeout: float = 10) -> None:
        """Return once the proxy has handled everything that reached it before this call
        (two turns of its loop): what it would forward is forwarded by then."""
        for _ in range(2):
            done = threading.Event()
            self._syncs.append(done)
            self._commands.put(("sync", None))
            self._wake_w.send(b"x")
            if not done.wait(timeout):
                self.check()
                raise AssertionError(f"the fault proxy did not answer within {timeout:g} s")

    def wait_fired(self, timeout: float) -> None:
        if not self.fired.wait(timeout):
            self.check()
            raise AssertionError(f"the fault never fired within {timeout:g} s; frames seen: "
                                 f"{[s for link in self.links for s in link.seen]}")

    @property
    def link(self) -> Link:
        """The armed (first) connection."""
        return self.links[0]

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"fault proxy thread failed: {self.error!r}") from self.error

    def close(self) -> None:
        if self._thread.is_alive():
            self._command("close", None)
            self._thread.join(10)
        self.check()

    def _command(self, what: str, fault: Fault | None) -> None:
        self._commands.put((what, fault))
        self._wake_w.send(b"x")

    # -- the proxy's thread ----------------------------------------------------------------
    def _main(self) -> None:
        try:
            while not self._closing:
                for key, _ in self._sel.select(self._timeout()):
                    self._ready(key.fileobj)   # type: ignore[arg-type]
                for link in self.links:
                    if not link.closed and not link.stalled:
                        self._flush(link, link.fwd)
                        self._flush(link, link.ret)
                self._interest()
                for _ in range(self._synced):
                    self._syncs.popleft().set()
                self._synced = 0
        except BaseException as e:  # noqa: BLE001 - reported by check()/close()
            self.error = e
        finally:
            for link in self.links:
                self._close_link(link)
            self._sel.close()
            for s in (self._lsock, self._wake_r, self._wake_w):
                s.close()

    def _ready(self, sock: socket.socket) -> None:
        if sock is self._wake_r:
            self._wake_r.recv(4096)
            while not self._commands.empty():
                self._run_command(*self._commands.get())
        elif sock is self._lsock:
            self._accept()
        else:
            for link in self.links:
                for d in (link.fwd, link.ret):
                    if d.src is sock and not link.closed and not link.stalled:
                        self._read(link, d)

    def _run_command(self, what: str, fault: Fault | None) -> None:
        armed = self.links[0] if self.links and self.links[0].plan is not None else None
        if what == "close":
            self._closing = True
        elif what == "sync":
            self._synced += 1
        elif what == "fire" and armed is not None:
            self._fire(armed)
        elif what == "apply" and armed is not None and fault is not None:
            self._apply(armed, fault)

    def _accept(self) -> None:
        try:
            client, _ = self._lsock.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.links.append(Link(client, upstream, None if self.links else self.plan))

    def _read(self, link: Link, d: Direction) -> None:
        try:
            data = d.src.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self._close_link(link)          # reset: the other side sees it go too
            return
        if not data:
            d.eof = True
            return
        d.received += len(data)
        if d is link.fwd and link.plan is not None and link.plan.record:
            link.recorded += data
        if d.frames is not None:
            frames, rest = d.frames.feed(data)
            for frame, msg in frames:
                self._frame(link, d, frame, msg)
            if rest:
                self._emit(link, d, rest)
        else:
            self._stream(link, data)

    def _stream(self, link: Link, data: bytes) -> None:
        plan, n = link.plan, link.after_header
        if (plan is not None and plan.point is Point.PRECOPY and n is not None
                and n < plan.precopy_bytes <= n + len(data)):
            k = plan.precopy_bytes - n
            self._emit(link, link.fwd, data[:k])
            self._reach(link, link.fwd)
            self._emit(link, link.fwd, data[k:])
        else:
            self._emit(link, link.fwd, data)
        if n is not None:
            link.after_header = n + len(data)

    def _frame(self, link: Link, d: Direction, frame: bytes, msg: ControlMessage) -> None:
        name = msg.stage.value if msg.stage is not None else msg.kind.name
        link.seen.append(f"{d.name} {name}")
        point = link.plan.point if link.plan is not None else None
        if msg.stage is AckStage.HEADER:
            if point is Point.SETUP:
                self._reach(link, d)        # before it passes: the fault applies to it
            self._emit(link, d, frame)
            link.after_header = 0
        elif msg.stage in _ACK_POINTS:
            if msg.stage is AckStage.PREPARED:
                link.fwd.frames = _Frames("fault proxy forward path")
            forwarded, swallowed = _ACK_POINTS[msg.stage]
            if point is not swallowed:
                self._emit(link, d, frame)
            if point in (forwarded, swallowed):
                self._reach(link, d)
        else:
            self._emit(link, d, frame)
            if msg.kind is ControlType.COMMIT and point is Point.COMMIT:
                self._reach(link, d)

    def _reach(self, link: Link, d: Direction) -> None:
        """The plan's point: fire once what ``d`` queued before it has been written;
        whatever is read meanwhile waits and then goes under the fault."""
        def fire() -> None:
            held, link.held = link.held or [], None
            self._fire(link)
            for hd, data in held:
                self._emit(link, hd, data)
        d.queue.append(_Chunk(time.monotonic() + link.delay, memoryview(b""), fire))
        link.held = []

    def _emit(self, link: Link, d: Direction, data: bytes) -> None:
        if link.held is not None:
            link.held.append((d, data))
            return
        if link.closed or d.discard:
            d.dropped += len(data)
            return
        if d.drop:
            n = min(d.drop, len(data))
            d.drop -= n
            d.dropped += n
            data = data[n:]
        if data:
            d.queue.append(_Chunk(time.monotonic() + link.delay, memoryview(data)))
            d.queued += len(data)

    def _fire(self, link: Link) -> None:
        if link.fired or link.plan is None:
            return
        link.fired = True
        if link.plan.fault is not None:
            self._apply(link, link.plan.fault)
        if link.plan.on_fire is not None:
            link.plan.on_fire()
        self.fired.set()

    def _apply(self, link: Link, fault: Fault) -> None:
        plan = link.plan or FaultPlan(fault)
        if fault is Fault.CUT:
            self._close_link(link)
        elif fault is Fault.STALL:
            link.stalled = True
        elif fault is Fault.DELAY:
            link.delay = plan.delay_s
        elif fault is Fault.DROP_BYTES:
            (link.fwd if plan.drop_forward else link.ret).drop = plan.drop_bytes
        elif fault is Fault.DROP_RETURN:
            link.ret.discard = True

    def _flush(self, link: Link, d: Direction) -> None:
        now = time.monotonic()
        while d.queue and not link.closed and not link.stalled:
            c = d.queue[0]
            if c.due > now:
                return
            n = len(c.data)
            if n and self.rate is not None:
                self._refill(d, now)
                n = min(n, int(d.tokens))
                if n <= 0:
                    return
            try:
                sent = d.dst.send(c.data[:n]) if n else 0
            except BlockingIOError:
                return
            except OSError:
                self._close_link(link)
                return
            d.tokens -= sent
            d.sent += sent
            d.queued -= sent
            c.data = c.data[sent:]
            if c.data:
                return
            d.queue.popleft()
            if c.then is not None:
                c.then()
        if d.eof and not d.queue and not d.shut and not link.closed:
            d.shut = True
            try:
                d.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if link.fwd.shut and link.ret.shut:
                self._close_link(link)

    def _refill(self, d: Direction, now: float) -> None:
        assert self.rate is not None
        burst = max(16 * 1024, self.rate / 50)
        d.tokens = min(burst, d.tokens + (now - d.stamp) * self.rate)
        d.stamp = now

    def _close_link(self, link: Link) -> None:
        if link.closed:
            return
        link.closed = True
        for s in link.sockets():
            if s in self._masks:
                self._sel.unregister(s)
                del self._masks[s]
            s.close()

    def _timeout(self) -> float | None:
        """Until the next delayed chunk is due or the rate allows its bytes (a chunk that
        is due and allowed waits for its socket instead: ``_interest``)."""
        waits = []
        now = time.monotonic()
        for link in self.links:
            if link.closed or link.stalled:
                continue
            for d in (link.fwd, link.ret):
                if not d.queue:
                    continue
                head = d.queue[0]
                if head.due > now:
                    waits.append(head.due - now)
                elif self.rate is not None and head.data and d.tokens < 1:
                    waits.append((min(CHUNK, len(head.data)) - d.tokens) / self.rate)
        return min(waits) if waits else None

    def _interest(self) -> None:
        now = time.monotonic()
        want: dict[socket.socket, int] = {}
        for link in self.links:
            if link.closed or link.stalled:
                continue
            for d in (link.fwd, link.ret):
                if not d.eof and d.queued < HIGH_WATER:
                    want[d.src] = want.get(d.src, 0) | selectors.EVENT_READ
                if d.queue and d.queue[0].due <= now and (self.rate is None or d.tokens >= 1
                                                          or not d.queue[0].data):
                    want[d.dst] = want.get(d.dst, 0) | selectors.EVENT_WRITE
        for s in list(self._masks):
            if s not in want:
                self._sel.unregister(s)
                del self._masks[s]
        for s, mask in want.items():
            if s not in self._masks:
                self._sel.register(s, mask)
            elif self._masks[s] != mask:
                self._sel.modify(s, mask)
            self._masks[s] = mask
