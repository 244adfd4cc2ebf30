"""File target for save and restore snapshots (docs/architecture.md §5): the same records as TCP.

``FileSink`` is a ``StreamSink`` (no return path: ``check_peer`` does nothing) and
``FileSource`` a stream ``Source``. Both go through ``KernelOps`` (docs/architecture.md §2: only the
kernel layer makes syscalls), so the restore path reads RAM payload with one ``readv`` per
record straight into guest memory, exactly like ``recv_into`` on a socket.

A snapshot holds guest RAM: the file is created with the process umask (the service unit
sets ``UMask=0077``), truncated if it exists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from vfiod.errors import KernelError
from vfiod.kernel.ops import KernelOps


class FileSink:
    def __init__(self, ops: KernelOps, path: str) -> None:
        self._ops = ops
        self.path = path
        self._fd: int | None = ops.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self.bytes_written = 0

    def send_buffers(self, buffers: Sequence[Any]) -> None:
        fd = self._require()
        for b in buffers:
            mv = memoryview(b).cast("B")
            off = 0
            while off < len(mv):
                try:
                    off += self._ops.write(fd, mv[off:])
                except KernelError as e:      # ENOSPC, EIO: name the snapshot, not the fd
                    raise e.with_context(target=self.path) from None
            self.bytes_written += len(mv)

    def check_peer(self) -> None:
        """Files have no receiver that could cancel."""

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._ops.close(fd)

    def _require(self) -> int:
        if self._fd is None:
            raise ValueError(f"snapshot {self.path} is closed")
        return self._fd

    def __enter__(self) -> FileSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileSource:
    def __init__(self, ops: KernelOps, path: str) -> None:
        self._ops = ops
        self.path = path
        self._fd: int | None = ops.open(path, os.O_RDONLY)

    def recv_into(self, view: memoryview) -> int:
        if self._fd is None:
            raise ValueError(f"snapshot {self.path} is closed")
        return self._ops.readinto(self._fd, view)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._ops.close(fd)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
