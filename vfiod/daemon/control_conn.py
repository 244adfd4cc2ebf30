"""One control connection's state between the control loop and its request worker
(docs/architecture.md §6, §8.1).

``ControlConn`` holds the bytes read but not yet answered, the fds that came with them
(``ReceivedFds``, tied to stream offsets), the deadline for its next complete request
line, and whether a request of it is being answered. The loop reads it only while no
request is (``in_request`` False); the worker that answers a request owns it until it
hands it back, so the two never touch it at once.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from vfiod.api.ops import MAX_FDS
from vfiod.daemon.received_fds import FD_BYTES, ReceivedFds, close_received

#: bytes asked of the kernel per read
READ_BYTES = 65536


@dataclass(frozen=True)
class RequestLine:
    line: bytes
    fds: tuple[int, ...]     # the fds that came with it (closed once it is answered)
    cut: bool                # the kernel dropped some of its fds (MSG_CTRUNC)


@dataclass(eq=False)
class ControlConn:
    sock: socket.socket
    #: monotonic time by which its next request line must be complete
    deadline: float
    #: when it began waiting for a new request with nothing read of it; None otherwise
    idle_since: float | None = field(default_factory=time.monotonic)
    in_request: bool = False
    #: monotonic time of its last answer (a worker sets it)
    answered_at: float = 0.0
    buf: bytes = b""
    base: int = 0            # stream offset of buf[0]: fds are tied to offsets
    fds: ReceivedFds = field(default_factory=ReceivedFds)

    def read(self) -> bool:
        """Read what the kernel holds (the loop's reads are non-blocking, a lingering
        worker's follow a poll); False at end of stream. Raises OSError if the peer went
        away, BlockingIOError if nothing came."""
        chunk, ancdata, flags, _ = self.sock.recvmsg(
            READ_BYTES, socket.CMSG_SPACE(MAX_FDS * FD_BYTES), socket.MSG_CMSG_CLOEXEC)
        self.fds.add(self.base + len(self.buf), ancdata, bool(flags & socket.MSG_CTRUNC))
        if not chunk:
            return False
        self.buf += chunk
        self.idle_since = None
        return True

    def next_line(self) -> RequestLine | None:
        """The next non-blank complete request line, taken off the buffer, or None."""
        while b"\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\n")
            end = self.base + len(line) + 1
            self.base = end
            fds, cut = self.fds.take_before(end)
            if line.strip():
                return RequestLine(line, fds, cut)
            for fd in fds:       # a blank line is no request; what came with it is dropped
                close_received(fd)
        return None

    def waiting(self, idle_timeout: float) -> None:
        """Back from its worker: the next request line is due ``idle_timeout`` after its
        last answer."""
        self.in_request = False
        self.deadline = self.answered_at + idle_timeout
        self.idle_since = None if self.buf else self.answered_at

    def close(self) -> None:
        self.fds.close_all()
        self.sock.close()
