"""``KernelOps``: every syscall vfiod makes, as one protocol (docs/architecture.md §2).

Only ``vfiod/kernel/linux.py`` implements it with real syscalls; ``vfiod/kernel/sim``
implements it with a simulated VFIO kernel held to the same checks and errno values.
Everything above this layer receives a ``KernelOps`` and never calls ``os``/``fcntl``/
``mmap`` for VFIO work itself, so it runs unchanged on either.

Conventions shared by both implementations:

* Every failure raises ``vfiod.errors.KernelError(errno, op, target)``. ``op`` is the
  ``label`` the caller passed (for ioctls: the kernel's name of the request) or the syscall
  name with its path.
* ``open`` always adds ``O_CLOEXEC``.
* ``ioctl(fd, request, arg)``: ``arg`` is an ``int`` passed by value (CHECK_EXTENSION,
  SET_IOMMU) or a writable buffer (``bytearray`` or a ctypes object) that the kernel reads
  and may write back, exactly as ``fcntl.ioctl(fd, request, buf, True)``. Pointers inside
  structs (bitmap data, range arrays) are real process addresses
  (``ctypes.addressof``); the simulator dereferences them like ``copy_from_user``.
* ``mmap`` returns an ``mmap.mmap``-compatible object (buffer protocol, ``close()``).
* ``memlock`` answers how much memory DMA may still pin (docs/kernel-contract.md §3.7: type1 MAP_DMA
  charges RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK); the simulator answers with
  its own limit and pinned bytes, so preflight sees the kernel vfiod really talks to.
* ``read_debugfs``/``list_debugfs`` read under the debugfs mount (``DEBUGFS_ROOT``; the
  simulator keeps its own view of its devices): what observing a device another VMM owns
  needs (docs/kernel-contract.md §12), with the kernel's errno values (ENOENT, EACCES).
"""

from __future__ import annotations

import ctypes
import mmap as _mmap
from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

#: What ``ioctl`` accepts as an in/out argument.
Buffer = Union[bytearray, ctypes.Structure, ctypes.Array, "ctypes._SimpleCData"]  # noqa: UP007

PROT_READ = _mmap.PROT_READ
PROT_WRITE = _mmap.PROT_WRITE
#: Where systemd (sys-kernel-debug.mount) and the kernel's documentation mount debugfs.
DEBUGFS_ROOT = "/sys/kernel/debug"


@dataclass(frozen=True)
class MemlockFacts:
    """RLIMIT_MEMLOCK as DMA pinning sees it."""

    soft: int | None          # bytes; None = unlimited
    hard: int | None
    locked: int               # bytes this process has locked already
    cap_ipc_lock: bool        # CAP_IPC_LOCK is effective: the limit does not apply

    def headroom(self) -> int | None:
        """Bytes that may still be pinned; None = no limit applies."""
        if self.cap_ipc_lock or self.soft is None:
            return None
        return max(0, self.soft - self.locked)


@dataclass(frozen=True)
class FdFacts:
    """What fstat(2) and fcntl(F_GETFL) say about an fd a peer handed over
    (docs/architecture.md §8.1): enough to check it before using it."""

    regular: bool             # S_ISREG: a memfd, a hugetlbfs or tmpfs file, a plain file
    kind: str                 # "regular", "directory", "socket", "fifo", "char", "block" ...
    size: int                 # st_size in bytes
    device: int               # st_dev and st_ino: the same file behind two fds
    inode: int
    writable: bool            # opened O_RDWR (MAP_SHARED with PROT_WRITE needs it)
    # -- VFIO hand-over (docs/architecture.md §8.1): what tells a VFIO fd's kind --------
    #: (major, minor) of a character device (st_rdev): /sys/dev/char/MAJ:MIN names it
    rdev: tuple[int, int] | None = None
    #: what /proc/self/fd/N links to: "/dev/vfio/7", "anon_inode:[vfio-device]" ...
    #: ("" where /proc is not mounted)
    link: str = ""


@runtime_checkable
class KernelOps(Protocol):
    """The syscalls vfiod needs. Paths are absolute and already include any test root."""

    # -- file descriptors -------------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        """open(2) with O_CLOEXEC added; ``mode`` applies with O_CREAT (default owner-only:
        snapshot files hold guest RAM)."""
        ...

    def close(self, fd: int) -> None:
        """close(2)."""
        ...

    def describe_fd(self, fd: int) -> FdFacts:
        """fstat(2), fcntl(F_GETFL) and the /proc/self/fd link of ``fd``; EBADF if it is
        not open."""
        ...

    def dup(self, fd: int) -> int:
        """fcntl(F_DUPFD_CLOEXEC): a second fd of the same open file."""
        ...

    def ioctl(self, fd: int, request: int, arg: int | Buffer = 0, label: str = "",
              target: str = "") -> int:
        """ioctl(2); returns the syscall's non-negative result."""
        ...

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        ...

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        ...

    def read(self, fd: int, length: int) -> bytes:
        ...

    def readinto(self, fd: int, buf: bytearray | memoryview) -> int:
        """read(2) into a caller buffer; returns the byte count (0 = end of stream)."""
        ...

    def pread_into(self, fd: int, buf: bytearray | memoryview, offset: int) -> int:
        """pread(2) of ``len(buf)`` bytes at ``offset`` into a caller buffer; returns the
        byte count (short at the end of the file)."""
        ...

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        ...

    def wait_readable(self, fd: int, timeout_s: float) -> bool:
        """poll(2) ``fd`` for POLLIN up to ``timeout_s``: True once a read would not block
        (data, end of stream or an error to report), False when the deadline passed."""
        ...

    def mmap(self, fd: int, length: int, offset: int = 0,
             prot: int = PROT_READ | PROT_WRITE) -> _mmap.mmap:
        """mmap(2) MAP_SHARED of ``length`` bytes of ``fd`` at ``offset``."""
        ...

    def anonymous_memory(self, length: int) -> _mmap.mmap:
        """mmap(2) MAP_PRIVATE|MAP_ANONYMOUS of ``length`` bytes: a working buffer whose
        pages go back to the kernel on ``close()`` (or when the object is freed), never
        into the C allocator's arenas."""
        ...

    def eventfd(self, initval: int = 0, flags: int = 0) -> int:
        ...

    def memfd_create(self, name: str, size: int) -> int:
        """A sparse memory file of ``size`` bytes (guest RAM backing; MFD_CLOEXEC)."""
        ...

    def mincore(self, addr: int, length: int) -> bytes:
        """Which pages of this process's memory at [addr, addr+length) are resident: one
        byte per page, bit 0 set for a resident one (mincore(2): ``addr`` page-aligned,
        EINVAL otherwise; ENOMEM where nothing is mapped; docs/kernel-contract.md §3.7)."""
        ...

    # -- sysfs / devfs reads for discovery ---------------------------------------------
    def readlink(self, path: str) -> str:
        ...

    def listdir(self, path: str) -> list[str]:
        ...

    def read_text(self, path: str) -> str:
        ...

    def exists(self, path: str) -> bool:
        ...

    # -- debugfs reads for observe-only devices (docs/kernel-contract.md §12) ----------------
    def read_debugfs(self, relpath: str) -> str:
        """The text of the debugfs file ``relpath`` (relative to ``DEBUGFS_ROOT``, no
        ``..``): ENOENT when it is not there, EACCES when this process may not read
        debugfs, the file's own errno otherwise (EINVAL: the driver could not say)."""
        ...

    def list_debugfs(self, relpath: str) -> list[str]:
        """The sorted entries of the debugfs directory ``relpath`` ("" = the mount's
        root; an unmounted debugfs is an empty directory); errors as ``read_debugfs``."""
        ...

    # -- limits ------------------------------------------------------------------------
    def memlock(self) -> MemlockFacts:
        """getrlimit(RLIMIT_MEMLOCK), the bytes already locked and CAP_IPC_LOCK."""
        ...
