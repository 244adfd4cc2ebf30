"""What a migration session needs from its transport, and a bandwidth-capped wrapper
(docs/architecture.md §5 transport, §4 bandwidth).

``Link`` is the slice of ``vfiod.migration.transport.tcp.Connection`` the sessions use:
the ``StreamSink``/``Source`` plus the return path. Control frames travel both ways on
one connection (``transport.control``): the destination sends ACK/CANCEL/ERROR back; the
source sends one DIGESTS frame after the MANIFEST (its RAM content digests: the commit),
which the destination reads after its last record. ``unsent_bytes``: the stream bytes the
source's send queue still holds (the downtime prediction counts them, §4).
``ready_bytes``: the bytes a send would pass at once, without pacing (a ``ThrottledLink``'s
bucket; 0 for an unpaced link, whose bandwidth is the wire's); the prediction takes them
off the stop-and-copy's time (§4).

``ThrottledLink`` caps the stream at ``rate_bps`` with a token bucket: a slower link in a
test or a benchmark (the prediction-error matrix), or an operator's bandwidth limit so a
migration leaves room for guest traffic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from vfiod.migration.transport.control import AckStage, ControlMessage, ControlType


class Link(Protocol):
    def send_buffers(self, buffers: Sequence[Any]) -> None: ...

    def check_peer(self) -> None: ...

    def unsent_bytes(self) -> int: ...

    def ready_bytes(self) -> int: ...

    def recv_into(self, view: memoryview) -> int: ...

    def send_control(self, msg: ControlMessage) -> None: ...

    def wait_ack(self, stage: AckStage, timeout: float) -> ControlMessage: ...

    def wait_control(self, kind: ControlType, timeout: float) -> ControlMessage: ...

    def close(self) -> None: ...


class ThrottledLink:
    """``link`` with its ``send_buffers`` paced to ``rate_bps`` bytes per second.

    Buffers are cut into pieces of at most ``burst_bytes`` and each piece waits for its
    tokens, so the rate holds over any window longer than a piece. Control frames
    (``send_control``) are not paced: an acknowledgement must not queue behind RAM.
    """

    def __init__(self, link: Link, rate_bps: float, *, burst_bytes: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] | None = None) -> None:
        if rate_bps <= 0:
            raise ValueError(f"bandwidth cap {rate_bps} B/s must be positive")
        self.link = link
        self.rate = float(rate_bps)
        # a link has no free bursts: the bucket holds about 2 ms of traffic
        self.burst = int(burst_bytes or max(16 * 1024, min(1 << 20, int(rate_bps / 500))))
        if self.burst <= 0:
            raise ValueError(f"burst {self.burst} must be positive")
        self._clock = clock
        self._stop = threading.Event()
        self._sleep = sleep or self._wait
        self._tokens = float(self.burst)
        self._t = clock()
        self.bytes_sent = 0

    def _wait(self, seconds: float) -> None:
        self._stop.wait(seconds)      # pacing, cut short by close()

    def _take(self, n: int) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._t) * self.rate)
        self._t = now
        self._tokens -= n
        if self._tokens < 0:
            self._sleep(-self._tokens / self.rate)

    def send_buffers(self, buffers: Sequence[Any]) -> None:
        piece: list[memoryview] = []
        size = 0
        for b in buffers:
            mv = memoryview(b).cast("B")
            while len(mv):
                take = mv[:self.burst - size]
                piece.append(take)
                size += len(take)
                mv = mv[len(take):]
                if size >= self.burst:
                    self._take(size)
                    self.link.send_buffers(piece)
                    self.bytes_sent += size
                    piece, size = [], 0
        if piece:
            self._take(size)
            self.link.send_buffers(piece)
            self.bytes_sent += size

    def close(self) -> None:
        self._stop.set()          # wake a paced send so a closing link does not linger
        self.link.close()

    def check_peer(self) -> None:
        self.link.check_peer()

    def unsent_bytes(self) -> int:
        return self.link.unsent_bytes()

    def ready_bytes(self) -> int:
        """The bucket's tokens now: what the next send passes before it waits. After an
        idle moment (the pause and the devices' arcs) the bucket is full, and the
        stop-and-copy's first ``burst`` bytes go at the wire's speed, not the cap's."""
        now = self._clock()
        return int(max(0.0, min(float(self.burst), self._tokens + (now - self._t) * self.rate)))

    def recv_into(self, view: memoryview) -> int:
        return self.link.recv_into(view)

    def send_control(self, msg: ControlMessage) -> None:
        self.link.send_control(msg)

    def wait_ack(self, stage: AckStage, timeout: float) -> ControlMessage:
        return self.link.wait_ack(stage, timeout)

    def wait_control(self, kind: ControlType, timeout: float) -> ControlMessage:
        return self.link.wait_control(kind, timeout)
