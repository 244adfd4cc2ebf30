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
import stat
import struct
import termios

from vfiod.errors import KernelError
from vfiod.kernel.linux_text import debugfs_path, memlock_from_status
from vfiod.kernel.ops import DEBUGFS_ROOT, PROT_READ, PROT_WRITE, Buffer, FdFacts, MemlockFacts

_libc = ctypes.CDLL(None, use_errno=True)
_libc.eventfd.argtypes = (ctypes.c_uint, ctypes.c_int)
_libc.eventfd.restype = ctypes.c_int
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
_libc.mincore.restype = ctypes.c_int
_EFD_CLOEXEC = 0o2000000
_M_TRIM_THRESHOLD = -1     # mallopt(3) parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
#: A debugfs file vfiod reads is one short line (docs/kernel-contract.md §12): read no more.
_DEBUGFS_READ_MAX = 4096
_FILE_KINDS = {stat.S_IFREG: "regular", stat.S_IFDIR: "directory", stat.S_IFSOCK: "socket",
               stat.S_IFIFO: "fifo", stat.S_IFCHR: "char", stat.S_IFBLK: "block",
               stat.S_IFLNK: "symlink"}


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

    def describe_fd(self, fd: int) -> FdFacts:
        try:
            st = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"fstat(fd {fd})") from None
        try:
            # a VFIO device fd from VFIO_GROUP_GET_DEVICE_FD is an anonymous inode that
            # fstat gives no type: its link says "anon_inode:[vfio-device]"
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            link = ""
        rdev = ((os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISCHR(st.st_mode)
                else None)
        return FdFacts(stat.S_ISREG(st.st_mode), _FILE_KINDS.get(stat.S_IFMT(st.st_mode),
                                                                "unknown"),
                       st.st_size, st.st_dev, st.st_ino,
                       flags & os.O_ACCMODE == os.O_RDWR, rdev, link)

    def dup(self, fd: int) -> int:
        try:
            return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"dup(fd {fd})") from None

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

    def mincore(self, addr: int, length: int) -> bytes:
        vec = (ctypes.c_ubyte * -(-length // _mmap.PAGESIZE))()
        if _libc.mincore(addr, length, vec) != 0:
            raise KernelError(ctypes.get_errno(), f"mincore({addr:#x}, {length})")
        return bytes(vec)

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

    def read_debugfs(self, relpath: str) -> str:
        path = debugfs_path(DEBUGFS_ROOT, relpath)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"open({path})") from None
        try:
            return os.read(fd, _DEBUGFS_READ_MAX).decode("utf-8", errors="replace")
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"read({path})") from None
        finally:
            os.close(fd)

    def list_debugfs(self, relpath: str) -> list[str]:
        return self.listdir(debugfs_path(DEBUGFS_ROOT, relpath))

    def memlock(self) -> MemlockFacts:
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        try:
            status = self.read_text("/proc/self/status")
        except KernelError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):   # no /proc: nothing locked
                raise
            status = ""
        return memlock_from_status(status, soft, hard)


# -- durable files (the daemon's journal under its state directory) ------------------------
# Module functions, not ``KernelOps`` methods: the journal is host filesystem state, not the
# device backend, and the simulated kernel keeps its journal on the real disk too. Each
# write is followed by fsync, each create or rename by an fsync of the directory, so what
# a function returned from survives a power cut (docs/architecture.md §1.8).

def _fsync_dir(path: str) -> None:
    """Make a directory's entries (a created, renamed or removed file) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"open({path})") from None
    try:
        os.fsync(fd)
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"fsync({path})") from None
    finally:
        os.close(fd)


def make_private_dir(path: str) -> None:
    """Create ``path`` (mode 0o700, parents as needed) unless it exists; a directory that
    exists keeps its mode (the service manager may have made it)."""
    if os.path.isdir(path):
        return
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"mkdir({path})") from None
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_file(path: str, limit: int | None = None) -> bytes:
    """The whole content of ``path`` (``KernelError`` ENOENT when there is none), or with
    ``limit`` at most ``limit + 1`` bytes of it: more than ``limit`` says it is too large
    without reading it all."""
    try:
        with open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit + 1)
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"read({path})") from None


def remove_file(path: str) -> bool:
    """Remove ``path`` durably; True if it was there (a path already gone is no error)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"unlink({path})") from None
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    return True


def open_append(path: str) -> int:
    """An O_APPEND fd on ``path`` (created 0o600 if missing, its directory entry fsynced),
    so every write lands at the end whatever the offset."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"open({path})") from None
    try:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except KernelError:
        os.close(fd)
        raise
    return fd


def write_all_fsync(fd: int, data: bytes) -> None:
    """Write all of ``data`` (a short write continues where it stopped), then fsync: when
    this returns, the bytes are on disk. On a failure some prefix may have been written."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"write+fsync(fd {fd})") from None


def truncate_fsync(fd: int, size: int) -> None:
    """Cut the file of ``fd`` back to ``size`` bytes, durably."""
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"ftruncate(fd {fd}, {size})") from None


def file_size(fd: int) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"fstat(fd {fd})") from None


def socket_unsent_bytes(sock_fd: int) -> int:
    """Bytes a TCP socket still holds in its send queue: not yet sent, or sent and not yet
    acknowledged by the peer (``SIOCOUTQ``, the same request as ``TIOCOUTQ``)."""
    try:
        out = fcntl.ioctl(sock_fd, termios.TIOCOUTQ, bytes(4))
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"ioctl(SIOCOUTQ, fd {sock_fd})") from None
    return int(struct.unpack("i", out)[0])


def close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"close({fd})") from None


def write_file_fsync(path: str, data: bytes) -> None:
    """Create or overwrite ``path`` (0o600) with ``data`` and fsync it: the first half of
    a durable replace (``rename_fsync_dir`` is the second)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"open({path})") from None
    try:
        write_all_fsync(fd, data)
    except KernelError as e:
        raise e.with_context(op=f"write+fsync({path})") from None
    finally:
        os.close(fd)


def rename_fsync_dir(src: str, dst: str) -> None:
    """Rename ``src`` over ``dst`` (atomic: a reader sees one file or the other, whole) and
    fsync the directory so the rename survives a power cut."""
    try:
        os.rename(src, dst)
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"rename({src}, {dst})") from None
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))
