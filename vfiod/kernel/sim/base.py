"""Building blocks of the simulated kernel: open-file objects, user memory, faults.

The simulated kernel (``SimKernel``) keeps an fd table mapping fd numbers to ``SimFile``
objects, one class per kind of kernel file (container, group, device, migration data fd,
iommufd, ...). Dispatch is on (file kind, request number) because the kernel reuses
request numbers across fd kinds (docs/kernel-contract.md §0).

User memory: pointers inside ioctl structs are real addresses in this process; the
simulator reads and writes them with ``copy_from_user``/``copy_to_user`` below, as the
kernel does, and answers EFAULT for a NULL pointer.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vfiod.errors import KernelError

if TYPE_CHECKING:
    from vfiod.kernel.ops import Buffer


def fail(err: int, op: str, target: str = "", detail: str = "") -> KernelError:
    """The error a failing simulated syscall raises (use: ``raise fail(EINVAL, ...)``)."""
    return KernelError(err, op, target, detail)


def copy_from_user(addr: int, length: int, op: str = "copy_from_user") -> bytes:
    if length < 0:
        raise fail(errno.EINVAL, op)
    if length == 0:
        return b""
    if addr == 0:
        raise fail(errno.EFAULT, op, detail="NULL user pointer")
    return ctypes.string_at(addr, length)


def copy_to_user(addr: int, data: bytes | bytearray | memoryview, op: str = "copy_to_user") -> None:
    if len(data) == 0:
        return
    if addr == 0:
        raise fail(errno.EFAULT, op, detail="NULL user pointer")
    src = (ctypes.c_char * len(data)).from_buffer_copy(data)
    ctypes.memmove(addr, src, len(data))


def arg_bytes(arg: int | Buffer) -> memoryview:
    """A writable byte view of an ioctl argument buffer (what the kernel would see)."""
    if isinstance(arg, int):
        raise TypeError("ioctl argument is a value, not a buffer")
    return memoryview(arg).cast("B")


class SimFile:
    """One open file of the simulated kernel. Subclasses override what their kind supports;
    the defaults answer like a kernel file without that operation."""

    kind = "file"
    #: request number -> kernel name of every ioctl this kind of file answers. SimKernel
    #: checks the fault point ``ioctl:<name>`` and answers ENOTTY for anything else.
    ioctl_names: dict[int, str] = {}

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.closed = False

    def ioctl(self, request: int, arg: int | Buffer, label: str) -> int:
        raise fail(errno.ENOTTY, label or f"ioctl({request:#x})", self.name)

    def read(self, length: int) -> bytes:
        raise fail(errno.EINVAL, "read", self.name)

    def readable(self) -> bool:
        """Whether poll(2) would report POLLIN now; a file that cannot block is always."""
        return True

    def write(self, data: bytes) -> int:
        raise fail(errno.EINVAL, "write", self.name)

    def pread(self, length: int, offset: int) -> bytes:
        raise fail(errno.ESPIPE, "pread", self.name)

    def pwrite(self, data: bytes, offset: int) -> int:
        raise fail(errno.ESPIPE, "pwrite", self.name)

    def mmap(self, length: int, offset: int, prot: int) -> object:
        raise fail(errno.ENODEV, "mmap", self.name)

    def release(self) -> None:
        """Called once when the last fd to this file is closed."""
        self.closed = True


@dataclass
class Fault:
    point: str
    errno: int
    skip: int = 0        # let this many matching events pass first
    count: int = 1       # then fail this many (-1 = for ever)
    hits: int = 0


@dataclass
class FaultInjector:
    """Deterministic fault injection at named points.

    Point names (exact match):
      ``ioctl:<KERNEL_NAME>``             e.g. ``ioctl:VFIO_IOMMU_DIRTY_PAGES``
      ``feature:<FEATURE_NAME>``          e.g. ``feature:DMA_LOGGING_REPORT``
      ``transition:<FROM>-><TO>``         one v2 arc, e.g. ``transition:PRE_COPY->STOP_COPY``
      ``v1:<bits>``                       a v1 device_state write, e.g. ``v1:SAVING``
      ``read:data_fd`` / ``write:data_fd`` a migration data-fd read or write
      ``stall:data_fd``                   a saving data fd that never becomes readable
      ``v1:read_data`` / ``v1:write_data`` a v1 data-window access
    A fault may also name a device: ``<point>@<device name>``.

    ``log`` lists every point checked, in order (tests read it). With ``log_limit`` set
    it keeps only the latest: between ``log_limit`` and twice that many entries (it is
    cut back in one step when it reaches twice the limit), so a long-running daemon's
    simulated host does not grow with every ioctl.
    """

    faults: list[Fault] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    log_limit: int | None = None

    def inject(self, point: str, err: int, *, skip: int = 0, count: int = 1) -> Fault:
        f = Fault(point, err, skip, count)
        self.faults.append(f)
        return f

    def clear(self) -> None:
        self.faults.clear()

    def check(self, point: str, op: str, target: str = "") -> None:
        """Raise the injected error if a live fault matches ``point`` (or ``point@target``)."""
        f = self._fire(point, target)
        if f is not None:
            raise fail(f.errno, op, target, detail=f"injected at {point}")

    def stalls(self, point: str, target: str = "") -> bool:
        """Whether a live fault at ``point`` fires: for points that model a file that never
        becomes ready (``stall:data_fd``), where the fault's errno is not used."""
        return self._fire(point, target) is not None

    def _fire(self, point: str, target: str) -> Fault | None:
        self.log.append(f"{point}@{target}" if target else point)
        if self.log_limit is not None and len(self.log) >= 2 * self.log_limit:
            del self.log[:len(self.log) - self.log_limit]
        for f in self.faults:
            if f.point not in (point, f"{point}@{target}"):
                continue
            if f.skip > 0:
                f.skip -= 1
                continue
            if f.count == 0:
                continue
            if f.count > 0:
                f.count -= 1
            f.hits += 1
            return f
        return None
