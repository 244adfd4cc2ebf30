"""Real syscalls behind ``KernelOps`` — the only module in vfiod that makes them.

Every fd is opened with O_CLOEXEC (docs/architecture.md §2) and every failure becomes a
``KernelError`` naming the operation and the object, with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap as _mmap
import os
import resource
import select

from vfiod.errors import KernelError
from vfiod.kernel.ops import PROT_READ, PROT_WRITE, Buffer, MemlockFacts

_libc = ctypes.CDLL(None, use_errno=True)
_libc.eventfd.argtypes = (ctypes.c_uint, ctypes.c_int)
_libc.eventfd.restype = ctypes.c_int
_EFD_CLOEXEC = 0o2000000
_M_TRIM_THRESHOLD = -1     # mallopt(3) parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_CAP_IPC_LOCK = 14    # bit of CapEff in /proc/self/status


def memlock_from_status(status: str, soft: int, hard: int) -> MemlockFacts:
    """``MemlockFacts`` from getrlimit's ``soft``/``hard`` and the text of
    ``/proc/self/status`` (``VmLck``: bytes locked; ``CapEff``: CAP_IPC_LOCK)."""
    locked, cap = 0, False
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "VmLck":
            parts = value.split()  # "  1234 kB"
            locked = int(parts[0]) * 1024 if parts else 0
        elif key == "CapEff":
            cap = bool(int(value.strip() or "0", 16) >> _CAP_IPC_LOCK & 1)

    def limit(v: int) -> int | None:
        return None if v == resource.RLIM_INFINITY or v < 0 else v

    return MemlockFacts(limit(soft), limit(hard), locked, cap)


def pin_malloc_thresholds(nbytes: int) -> bool:
    """Fix the C library's mmap and trim thresholds at ``nbytes`` (glibc ``mallopt(3)``):
    an allocation of at least that size gets a mapping of its own, unmapped when freed,
    and an arena gives back free memory above that. Left alone, glibc raises both after
    freeing a large block (up to 32 and 64 MiB), and a process whose short-lived threads
    are handed its arenas in turn keeps that much resident in every arena (README
    "Limits"). Returns False where the C library has no ``mallopt`` (not glibc)."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, nbytes)) and bool(mallopt(_M_TRIM_THRESHOLD, nbytes))


class LinuxKernel:
    """``KernelOps`` over the running kernel."""

    name = "linux"

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        try:
            return os.open(path, flags | os.O_CLOEXEC, mode)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"open({path})") from None

    def close(self, fd: int) -> None:
        try:
            os.close(fd)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"close({fd})") from None

    def ioctl(self, fd: int, request: int, arg: int | Buffer = 0, label: str = "",
              target: str = "") -> int:
        try:
            if isinstance(arg, int):
                return fcntl.ioctl(fd, request, arg)
            # mutate_flag=True: the kernel's answer is written back into ``arg``.
            return fcntl.ioctl(fd, request, arg, True)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, label or f"ioctl({request:#x})",
                              target) from None

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        try:
            return os.pread(fd, length, offset)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"pread(fd {fd}, {length}@{offset:#x})") from None

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        try:
            return os.pwrite(fd, data, offset)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"pwrite(fd {fd}, @{offset:#x})") from None

    def read(self, fd: int, length: int) -> bytes:
        try:
            return os.read(fd, length)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"read(fd {fd})") from None

    def readinto(self, fd: int, buf: bytearray | memoryview) -> int:
        try:
            return os.readv(fd, [buf])
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"read(fd {fd})") from None

    def pread_into(self, fd: int, buf: bytearray | memoryview, offset: int) -> int:
        try:
            return os.preadv(fd, [buf], offset)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO,
                              f"pread(fd {fd}, {len(buf)}@{offset:#x})") from None

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        try:
            return os.write(fd, data)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"write(fd {fd})") from None

    def wait_readable(self, fd: int, timeout_s: float) -> bool:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        try:
            # any event (POLLIN, POLLERR, POLLHUP) means the next read returns at once
            return bool(poller.poll(max(0, int(timeout_s * 1000))))
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"poll(fd {fd})") from None

    def mmap(self, fd: int, length: int, offset: int = 0,
             prot: int = PROT_READ | PROT_WRITE) -> _mmap.mmap:
        try:
            return _mmap.mmap(fd, length, flags=_mmap.MAP_SHARED, prot=prot, offset=offset)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"mmap(fd {fd}, {length}@{offset:#x})") from None

    def anonymous_memory(self, length: int) -> _mmap.mmap:
        try:
            return _mmap.mmap(-1, length, flags=_mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS,
                              prot=PROT_READ | PROT_WRITE)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"mmap(anonymous, {length})") from None

    def eventfd(self, initval: int = 0, flags: int = 0) -> int:
        fd = _libc.eventfd(initval, flags | _EFD_CLOEXEC)
        if fd < 0:
            raise KernelError(ctypes.get_errno(), "eventfd")
        return fd

    def memfd_create(self, name: str, size: int) -> int:
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            return fd
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"memfd_create({name}, {size})") from None

    def readlink(self, path: str) -> str:
        try:
            return os.readlink(path)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"readlink({path})") from None

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"listdir({path})") from None

    def read_text(self, path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"read({path})") from None

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def memlock(self) -> MemlockFacts:
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        try:
            status = self.read_text("/proc/self/status")
        except KernelError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):   # no /proc: nothing locked
                raise
            status = ""
        return memlock_from_status(status, soft, hard)
