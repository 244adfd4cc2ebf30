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
``stop-and-copy`` (the first record the source sends paused: a RAM record without
``RAM_LIVE``, an END_OF_STATE or the MANIFEST; recognised, since a stop-and-copy now lasts
milliseconds, too short for a test polling the source's status to act in),
ACK prepared forwarded or swallowed, COMMIT forwarded, ACK resumed forwarded or
swallowed. "Forwarded" means written to the other side before the fault applies.

Only the first connection gets the plan (the migration); later ones (the outcome queries
after a fault) are forwarded cleanly, as a network that healed would. Everything runs on
one thread around a selector; ``trigger``/``apply`` reach it through a queue and a wake-up
socket, and nothing waits by sleeping.
"""

from __future__ import annotations

import queue
import selectors
import socket
import threading
import time
from collections import deque

from tests.support.fault_link import Direction, Fault, FaultPlan, Link

HIGH_WATER = 256 * 1024          # a direction stops reading with this much queued
CHUNK = 64 * 1024


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
                link.close()
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
            armed.fire()
        elif what == "apply" and armed is not None and fault is not None:
            armed.apply(fault)

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
        self.links.append(Link(client, upstream, None if self.links else self.plan,
                               on_close=self._release, on_fired=self.fired.set))

    def _read(self, link: Link, d: Direction) -> None:
        try:
            data = d.src.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            link.close()          # reset: the other side sees it go too
            return
        if not data:
            d.eof = True
            return
        link.ingest(d, data)

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
                link.close()
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
                link.close()

    def _refill(self, d: Direction, now: float) -> None:
        assert self.rate is not None
        burst = max(16 * 1024, self.rate / 50)
        d.tokens = min(burst, d.tokens + (now - d.stamp) * self.rate)
        d.stamp = now

    def _release(self, link: Link) -> None:
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
