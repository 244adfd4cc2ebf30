"""``SimKernel``: the ``KernelOps`` protocol over a simulated VFIO kernel (docs/architecture.md §2).

It owns an fd table of ``SimFile`` objects (container, group, device, cdev, iommufd, data
fds) and dispatches every call on the fd's file. Request numbers are reused across fd
kinds (docs/kernel-contract.md §0), so each file kind has its own request → kernel-name table; an
unknown request is ENOTTY, like the kernel.

What is real: memory. ``memfd_create``, ``eventfd`` and ``mmap`` of those fds go to a
``LinuxKernel`` (this stays the only syscall path), sysfs reads are served from the real
tree ``SimHost`` built in a temporary directory, and ``open`` of any path that is not a
simulated device node (guest RAM files, sysfs attributes) is a real open.

Simulated fd numbers start at ``SIM_FD_BASE`` = 2**20, the default ``fs.nr_open``, so they
cannot collide with a real fd of this process. Every ioctl first passes the fault point
``ioctl:<KERNEL_NAME>`` (``FaultInjector``) with the file's name as target (the device
name for device fds), so a test can fail one exact call.
"""

from __future__ import annotations

import errno
import mmap as _mmap
import os
import threading
from collections import Counter
from collections.abc import Callable

from vfiod.errors import KernelError
from vfiod.kernel.linux import LinuxKernel
from vfiod.kernel.ops import PROT_READ, PROT_WRITE, Buffer, FdFacts, MemlockFacts
from vfiod.kernel.sim.base import FaultInjector, SimFile, fail
from vfiod.kernel.sim.debugfs import SimDebugfs
from vfiod.kernel.sim.fdfacts import sim_fd_facts

SIM_FD_BASE = 1 << 20

#: Opens a simulated device node: (open flags) -> the new open file.
NodeOpener = Callable[[int], SimFile]


class SimKernel:
    """A simulated VFIO kernel. ``SimHost.build`` registers its device nodes."""

    name = "sim"

    def __init__(self, linux: LinuxKernel | None = None,
                 faults: FaultInjector | None = None) -> None:
        self.linux = linux or LinuxKernel()
        self.faults = faults or FaultInjector()
        self._files: dict[int, SimFile] = {}
        self._next_fd = SIM_FD_BASE
        self._nodes: dict[str, NodeOpener] = {}
        #: bytes pinned for DMA and charged to RLIMIT_MEMLOCK (type1 MAP_DMA, IOAS_MAP)
        self.locked_bytes = 0
        #: RLIMIT_MEMLOCK for DMA pinning; None = the caller has CAP_IPC_LOCK
        self.memlock_limit: int | None = None
        # One lock for the whole simulated kernel: callers may use threads (a dirty-sync
        # worker next to the control loop); the kernel's own locks are finer, the outcome
        # of each call is the same. Re-entrant: a file may install a new fd mid-call.
        self.lock = threading.RLock()
        #: opens of each simulated device node (/dev/vfio/N, cdevs, the container): a
        #: test proves that observing a device opens none (docs/kernel-contract.md §12)
        self.node_opens: Counter[str] = Counter()
        #: the debugfs view of the devices ``SimHost`` registers (``read_debugfs``)
        self.debugfs = SimDebugfs(self.faults, self.lock)

    # -- the FdTable contract (interfaces.py) ----------------------------------------------
    def install(self, file: SimFile) -> int:
        """Give ``file`` a new fd (like anon_inode_getfd with O_CLOEXEC)."""
        with self.lock:
            fd = self._next_fd
            self._next_fd += 1
            self._files[fd] = file
            return fd

    def register_node(self, path: str, opener: NodeOpener) -> None:
        """Make ``open(path)`` create a simulated file (used by ``SimHost``)."""
        self._nodes[os.path.normpath(path)] = opener

    def file_of(self, fd: int) -> SimFile | None:
        """The simulated file behind ``fd`` (None for a real or unknown fd)."""
        return self._files.get(fd)

    def is_sim_fd(self, fd: int) -> bool:
        return fd >= SIM_FD_BASE

    def open_files(self) -> dict[int, SimFile]:
        """A snapshot of the fd table (tests check that nothing leaked)."""
        with self.lock:
            return dict(self._files)

    def _file(self, fd: int, op: str) -> SimFile | None:
        f = self._files.get(fd)
        if f is None and fd >= SIM_FD_BASE:
            raise fail(errno.EBADF, op, detail=f"fd {fd} is not open")
        return f

    # -- file descriptors ------------------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        opener = self._nodes.get(os.path.normpath(path))
        if opener is None:
            return self.linux.open(path, flags, mode)
        with self.lock:
            self.node_opens[os.path.normpath(path)] += 1
            try:
                file = opener(flags)
            except KernelError as e:
                raise e.with_context(op=f"open({path})") from None
            return self.install(file)

    def describe_fd(self, fd: int) -> FdFacts:
        """Real fds (RAM a peer handed over) are described by the real kernel; a
        simulated file as the real kernel describes its kind (``fdfacts.py``)."""
        with self.lock:
            f = self._file(fd, f"fstat(fd {fd})")
            if f is not None:
                return sim_fd_facts(f, fd)
        return self.linux.describe_fd(fd)

    def dup(self, fd: int) -> int:
        """A second fd of the same open file: the file is released with its last fd, so
        closing one copy leaves the other working (docs/architecture.md §8.1)."""
        with self.lock:
            f = self._file(fd, f"dup(fd {fd})")
            if f is not None:
                return self.install(f)
        return self.linux.dup(fd)

    def close(self, fd: int) -> None:
        with self.lock:
            f = self._file(fd, f"close({fd})")
            if f is None:
                self.linux.close(fd)
                return
            del self._files[fd]
            if not any(other is f for other in self._files.values()):
                f.release()

    def ioctl(self, fd: int, request: int, arg: int | Buffer = 0, label: str = "",
              target: str = "") -> int:
        with self.lock:
            f = self._file(fd, label or f"ioctl({request:#x})")
            if f is None:
                return self.linux.ioctl(fd, request, arg, label, target)
            name = f.ioctl_names.get(request)
            op = label or name or f"ioctl({request:#x})"
            if name is None:
                raise fail(errno.ENOTTY, op, target or f.name,
                           f"request {request:#x} is not a {f.kind} fd ioctl")
            try:
                self.faults.check(f"ioctl:{name}", op, f.name)
                return f.ioctl(request, arg, op)
            except KernelError as e:
                raise e.with_context(op=op, target=target or e.target or f.name) from None

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        with self.lock:
            f = self._file(fd, "pread")
            if f is None:
                return self.linux.pread(fd, length, offset)
            return f.pread(length, offset)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        with self.lock:
            f = self._file(fd, "pwrite")
            if f is None:
                return self.linux.pwrite(fd, data, offset)
            return f.pwrite(bytes(data), offset)

    def read(self, fd: int, length: int) -> bytes:
        with self.lock:
            f = self._file(fd, "read")
            if f is None:
                return self.linux.read(fd, length)
            return f.read(length)

    def readinto(self, fd: int, buf: bytearray | memoryview) -> int:
        with self.lock:
            f = self._file(fd, "read")
            if f is None:
                return self.linux.readinto(fd, buf)
            view = memoryview(buf).cast("B")
            data = f.read(len(view))
            view[:len(data)] = data
            return len(data)

    def pread_into(self, fd: int, buf: bytearray | memoryview, offset: int) -> int:
        with self.lock:
            f = self._file(fd, "pread")
            if f is None:
                return self.linux.pread_into(fd, buf, offset)
            view = memoryview(buf).cast("B")
            data = f.pread(len(view), offset)
            view[:len(data)] = data
            return len(data)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        with self.lock:
            f = self._file(fd, "write")
            if f is None:
                return self.linux.write(fd, data)
            return f.write(bytes(data))

    def wait_readable(self, fd: int, timeout_s: float) -> bool:
        with self.lock:
            f = self._file(fd, "poll")
            if f is None:
                return self.linux.wait_readable(fd, timeout_s)
            if f.readable():
                return True
        # a stalled file stays so: block as poll(2) would, outside the kernel lock
        threading.Event().wait(timeout_s)
        return False

    def mmap(self, fd: int, length: int, offset: int = 0,
             prot: int = PROT_READ | PROT_WRITE) -> _mmap.mmap:
        with self.lock:
            f = self._file(fd, "mmap")
            if f is None:
                return self.linux.mmap(fd, length, offset, prot)
            return f.mmap(length, offset, prot)  # type: ignore[return-value]

    def anonymous_memory(self, length: int) -> _mmap.mmap:
        return self.linux.anonymous_memory(length)

    def eventfd(self, initval: int = 0, flags: int = 0) -> int:
        return self.linux.eventfd(initval, flags)

    def memfd_create(self, name: str, size: int) -> int:
        return self.linux.memfd_create(name, size)

    def mincore(self, addr: int, length: int) -> bytes:
        return self.linux.mincore(addr, length)       # the memory is real

    # -- sysfs / devfs reads: the real tree SimHost built ----------------------------------
    def readlink(self, path: str) -> str:
        return self.linux.readlink(path)

    def listdir(self, path: str) -> list[str]:
        return self.linux.listdir(path)

    def read_text(self, path: str) -> str:
        return self.linux.read_text(path)

    def exists(self, path: str) -> bool:
        return self.linux.exists(path)

    # -- debugfs: the simulated devices' live state (sim/debugfs.py) -------------------------
    def read_debugfs(self, relpath: str) -> str:
        return self.debugfs.read_file(relpath)

    def list_debugfs(self, relpath: str) -> list[str]:
        return self.debugfs.list_dir(relpath)

    # -- limits: the simulated kernel's own, not this process's -------------------------------
    def memlock(self) -> MemlockFacts:
        """``memlock_limit`` and the bytes DMA pinned here; no limit is CAP_IPC_LOCK."""
        limit = self.memlock_limit
        if limit is None:
            return MemlockFacts(None, None, 0, True)
        return MemlockFacts(limit, limit, int(self.locked_bytes), False)
