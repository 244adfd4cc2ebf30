"""fds received with control requests (``SCM_RIGHTS``), tied to the request line they
came with (docs/architecture.md §8.1). The control server (``control_server.py``) owns
them and closes them once the line was answered; a handler that keeps one makes its own
copy.
"""

from __future__ import annotations

import array
import logging
import socket

from vfiod.errors import KernelError
from vfiod.kernel.linux import close_fd

log = logging.getLogger("vfiod.control")


#: bytes of one fd in an SCM_RIGHTS message (a C int)
FD_BYTES = array.array("i").itemsize


def close_received(fd: int) -> None:
    try:
        close_fd(fd)
    except KernelError as e:
        log.error("control: closing a received fd: %s", e)


class ReceivedFds:
    """fds received on one connection, each batch tied to the stream offset of the
    first byte it came with, until the line holding that byte is handled."""

    def __init__(self) -> None:
        self._batches: list[tuple[int, tuple[int, ...]]] = []
        self._cut: list[int] = []          # offsets where the kernel dropped fds

    def add(self, offset: int, ancdata: list[tuple[int, int, bytes]], cut: bool) -> None:
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(data[:len(data) - len(data) % FD_BYTES])
                self._batches.append((offset, tuple(got)))
        if cut:
            self._cut.append(offset)

    def take_before(self, end: int) -> tuple[tuple[int, ...], bool]:
        """The fds that came with bytes before stream offset ``end`` (now the caller's),
        and whether any were dropped there."""
        mine = [fds for off, fds in self._batches if off < end]
        self._batches = [(off, fds) for off, fds in self._batches if off >= end]
        cut = any(off < end for off in self._cut)
        self._cut = [off for off in self._cut if off >= end]
        return tuple(fd for fds in mine for fd in fds), cut

    def close_all(self) -> None:
        """Close every fd still held: the connection ended before their line came."""
        taken, _ = self.take_before(1 << 62)
        for fd in taken:
            close_received(fd)
