"""A VFIO device fd: info, regions, IRQ info, reset, region access and mmap
(docs/kernel-contract.md §3.3-§3.5), plus the feature primitives mixed in from ``features.py``.

Region access is ``pread``/``pwrite`` on the device fd at ``region.offset + off`` (the
offset is the kernel's; never computed here) or ``mmap`` of a range the region allows.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

import vfiod.abi.vfio as v
from vfiod.errors import KernelError
from vfiod.kernel.ops import PROT_READ, PROT_WRITE, KernelOps
from vfiod.vfio.call import OwnedFd, ioctl, renamed
from vfiod.vfio.features import DeviceFeatures
from vfiod.vfio.regions import IrqInfo, RegionInfo, query_irq_info, query_region_info

if TYPE_CHECKING:
    from mmap import mmap as MmapObject

    from vfiod.vfio.group import Group


@dataclass(frozen=True)
class VfioDeviceInfo:
    """``VFIO_DEVICE_GET_INFO`` answer."""

    flags: int
    num_regions: int
    num_irqs: int

    @property
    def can_reset(self) -> bool:
        return bool(self.flags & v.VFIO_DEVICE_FLAGS_RESET)

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & v.VFIO_DEVICE_FLAGS_PCI)


class Device(OwnedFd, DeviceFeatures):
    """One device fd. Obtain from ``Group.get_device``, or ``Device(kernel, fd, name)``
    for an fd handed over by a VMM."""

    def __init__(self, kernel: KernelOps, fd: int, name: str, group: Group | None = None):
        super().__init__(kernel, fd, name)
        self.group = group
        self._info: VfioDeviceInfo | None = None
        self._regions: dict[int, RegionInfo] = {}

    def info(self) -> VfioDeviceInfo:
        if self._info is None:
            arg = v.vfio_device_info(argsz=ctypes.sizeof(v.vfio_device_info))
            ioctl(self.kernel, self.fd, v.VFIO_DEVICE_GET_INFO, arg, "VFIO_DEVICE_GET_INFO",
                  self.name)
            # device capabilities (zPCI, ...) are not used by vfiod: no second call
            self._info = VfioDeviceInfo(arg.flags, arg.num_regions, arg.num_irqs)
        return self._info

    # -- regions ------------------------------------------------------------------------
    def region_info(self, index: int) -> RegionInfo:
        """Region ``index`` with its capabilities (cached: regions are fixed while open)."""
        if index not in self._regions:
            self._regions[index] = query_region_info(self.kernel, self.fd, index, self.name)
        return self._regions[index]

    def regions(self) -> list[RegionInfo]:
        """Every region the device reports. Indexes the driver does not implement answer
        EINVAL (e.g. VGA on a non-VGA device) and are left out."""
        out = []
        for index in range(self.info().num_regions):
            try:
                out.append(self.region_info(index))
            except KernelError as e:
                if e.errno != errno.EINVAL:
                    raise
        return out

    def find_region(self, rtype: int, subtype: int) -> RegionInfo | None:
        """The region whose TYPE capability is (``rtype``, ``subtype``), if any."""
        for r in self.regions():
            if r.type == rtype and r.subtype == subtype:
                return r
        return None

    def _span(self, index: int, offset: int, length: int, need: int, what: str) -> RegionInfo:
        r = self.region_info(index)
        if offset < 0 or length < 0 or offset + length > r.size:
            raise ValueError(f"{what} on {self.name}: {length} bytes at {offset:#x} fall "
                             f"outside region {index} ({r.size:#x} bytes)")
        if need and not r.flags & need:
            kind = "readable" if need == v.VFIO_REGION_INFO_FLAG_READ else "writable"
            raise ValueError(f"{what} on {self.name}: region {index} is not {kind}")
        return r

    def read_region(self, index: int, offset: int, length: int) -> bytes:
        """pread ``length`` bytes at ``offset`` into region ``index`` (loops on short reads)."""
        what = f"pread(region {index} +{offset:#x})"
        r = self._span(index, offset, length, v.VFIO_REGION_INFO_FLAG_READ, what)
        parts: list[bytes] = []
        done = 0
        while done < length:
            try:
                chunk = self.kernel.pread(self.fd, length - done, r.offset + offset + done)
            except KernelError as e:
                raise renamed(e, what, self.name) from None
            if not chunk:
                raise KernelError(errno.EIO, what, self.name,
                                  f"short read: {done} of {length} bytes")
            parts.append(chunk)
            done += len(chunk)
        return b"".join(parts)

    def write_region(self, index: int, offset: int, data: bytes | bytearray | memoryview) -> int:
        """pwrite ``data`` at ``offset`` into region ``index`` (loops on short writes)."""
        what = f"pwrite(region {index} +{offset:#x})"
        view = memoryview(data).cast("B")
        r = self._span(index, offset, len(view), v.VFIO_REGION_INFO_FLAG_WRITE, what)
        done = 0
        while done < len(view):
            try:
                n = self.kernel.pwrite(self.fd, view[done:], r.offset + offset + done)
            except KernelError as e:
                raise renamed(e, what, self.name) from None
            if n <= 0:
                raise KernelError(errno.EIO, what, self.name,
                                  f"short write: {done} of {len(view)} bytes")
            done += n
        return done

    def mmap_region(self, index: int, offset: int, length: int,
                    prot: int = PROT_READ | PROT_WRITE) -> MmapObject:
        """mmap ``length`` bytes at ``offset`` of region ``index``; the range must lie in
        one area the region allows (MMAP flag, sparse-mmap list)."""
        what = f"mmap(region {index} +{offset:#x}, {length:#x})"
        r = self._span(index, offset, length, 0, what)
        if length == 0 or not any(a <= offset and offset + length <= a + s
                                  for a, s in r.mmap_areas()):
            raise ValueError(f"{what} on {self.name}: not inside an mmappable area "
                             f"of region {index} (areas {list(r.mmap_areas())})")
        try:
            return self.kernel.mmap(self.fd, length, r.offset + offset, prot)
        except KernelError as e:
            raise renamed(e, what, self.name) from None

    # -- IRQs, reset ---------------------------------------------------------------------
    def irq_info(self, index: int) -> IrqInfo:
        return query_irq_info(self.kernel, self.fd, index, self.name)

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: also returns migration to RUNNING and ends any data fd
        session (§3.5); the only way out of ERROR."""
        ioctl(self.kernel, self.fd, v.VFIO_DEVICE_RESET, 0, "VFIO_DEVICE_RESET", self.name)

    def __repr__(self) -> str:
        return f"Device({self.name!r}, fd={self.fd})"
