"""The fixed vfio-pci part of a simulated device: BARs, ROM, config space, VGA and the five
IRQ indexes (docs/kernel-contract.md §3.3 - §3.4).

Region offsets in the device fd follow vfio-pci: ``index << 40`` (callers must still use
the ``offset`` from REGION_INFO verbatim). Sizes come from the spec:
``spec.extra["bars"]`` = {index: size} (default: a 1 MiB mmappable BAR0 for "pci"
devices, an 8-byte I/O BAR0 like mtty's for "mdev"), ``spec.extra["msix_bar"]`` (the BAR
holding the MSI-X table: it carries the MSIX_MAPPABLE capability), ``msix_count``,
``config_size`` (4096 PCIe / 256 conventional). mmappable BARs are backed by a real memfd
(through ``LinuxKernel``), so pread/pwrite and every mmap see the same bytes.
"""

from __future__ import annotations

import errno
import mmap as _mmap
import struct
from dataclasses import dataclass

import vfiod.abi.vfio as v
from vfiod.kernel.linux import LinuxKernel
from vfiod.kernel.sim.base import fail
from vfiod.kernel.sim.interfaces import DeviceSpec

PAGE_SIZE = 4096
REGION_SHIFT = 40                      # VFIO_PCI_OFFSET_SHIFT
REGION_OFFSET_MASK = (1 << REGION_SHIFT) - 1

_RW = v.VFIO_REGION_INFO_FLAG_READ | v.VFIO_REGION_INFO_FLAG_WRITE


def region_offset(index: int) -> int:
    return index << REGION_SHIFT


def split_offset(offset: int) -> tuple[int, int]:
    return offset >> REGION_SHIFT, offset & REGION_OFFSET_MASK


@dataclass
class FixedRegion:
    index: int
    size: int
    flags: int
    caps: list[bytes]


class _Bar:
    """One BAR's bytes: a bytearray, or a memfd mapping when the BAR can be mmapped."""

    def __init__(self, size: int, mmappable: bool, linux: LinuxKernel, label: str) -> None:
        self.size = size
        self.mmappable = mmappable
        self._linux = linux
        self._label = label
        self._fd: int | None = None
        self._map: _mmap.mmap | None = None
        self._buf = bytearray(0 if mmappable else size)

    def _backing(self) -> _mmap.mmap:
        if self._map is None:
            length = -(-self.size // PAGE_SIZE) * PAGE_SIZE
            self._fd = self._linux.memfd_create(self._label, length)
            self._map = self._linux.mmap(self._fd, length)
        return self._map

    def read(self, off: int, length: int) -> bytes:
        if self.mmappable:
            return bytes(self._backing()[off:off + length])
        return bytes(self._buf[off:off + length])

    def write(self, off: int, data: bytes) -> None:
        if self.mmappable:
            self._backing()[off:off + len(data)] = data
        else:
            self._buf[off:off + len(data)] = data

    def mmap(self, length: int, off: int, prot: int) -> _mmap.mmap:
        self._backing()
        assert self._fd is not None
        return self._linux.mmap(self._fd, length, off, prot)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            self._linux.close(self._fd)
            self._fd = None


class PciFunction:
    """Config space, BARs and IRQ state of one device."""

    def __init__(self, spec: DeviceSpec, linux: LinuxKernel) -> None:
        self.spec = spec
        mdev = spec.kind == "mdev"
        bars = spec.extra.get("bars", {0: 8} if mdev else {0: 1 << 20})
        assert isinstance(bars, dict)
        self.msix_bar: int | None = spec.extra.get(  # type: ignore[assignment]
            "msix_bar", None if mdev else 0)
        self.msix_count = int(spec.extra.get("msix_count", 0 if mdev else 8))  # type: ignore[call-overload]
        self.reset_works = bool(spec.extra.get("reset", True))
        self.bars: dict[int, _Bar] = {}
        for index, size in bars.items():
            if not 0 <= index <= 5 or size < 0:
                raise ValueError(f"{spec.name}: bad BAR {index} of size {size}")
            mmappable = not mdev and size >= PAGE_SIZE
            self.bars[index] = _Bar(size, mmappable, linux, f"sim-bar{index}-{spec.name}")
        self.config_size = int(spec.extra.get("config_size", 256 if mdev else 4096))  # type: ignore[call-overload]
        self.config = bytearray(self.config_size)
        self._config_reset()
        # irq index -> {vector: eventfd}
        self.irq_fds: dict[int, dict[int, int]] = {}
        self.irq_masked: dict[int, set[int]] = {}

    def _config_reset(self) -> None:
        c = self.config
        c[:] = bytes(len(c))
        struct.pack_into("<HH", c, 0, self.spec.vendor, self.spec.device)
        c[0x0B] = 0x02                              # class: network controller
        struct.pack_into("<HH", c, 0x2C, self.spec.vendor, self.spec.device)  # subsystem

    def close(self) -> None:
        """Free the real memory behind the BARs (host teardown)."""
        for bar in self.bars.values():
            bar.close()

    def reset(self) -> None:
        """Function-level reset: config space back to power-on, interrupts torn down."""
        self._config_reset()
        self.irq_fds.clear()
        self.irq_masked.clear()

    # -- regions ---------------------------------------------------------------------------
    def region(self, index: int) -> FixedRegion:
        """REGION_INFO facts of fixed region ``index`` (0 .. VFIO_PCI_NUM_REGIONS-1)."""
        if index in self.bars:
            bar = self.bars[index]
            flags = _RW
            caps: list[bytes] = []
            if bar.mmappable:
                flags |= v.VFIO_REGION_INFO_FLAG_MMAP
                if index == self.msix_bar:
                    hdr = v.vfio_info_cap_header(id=v.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE,
                                                 version=1, next=0)
                    caps.append(bytes(hdr))
            return FixedRegion(index, bar.size, flags, caps)
        if index == v.VFIO_PCI_CONFIG_REGION_INDEX:
            return FixedRegion(index, self.config_size, _RW, [])
        return FixedRegion(index, 0, 0, [])       # no ROM, no VGA: size 0 = not present

    def _clip(self, size: int, off: int, length: int, op: str, name: str) -> int:
        if off >= size or length < 0:
            raise fail(errno.EINVAL, op, name, f"offset {off:#x} outside the {size}-byte region")
        return min(length, size - off)

    def pread(self, index: int, off: int, length: int, name: str) -> bytes:
        op = f"pread(region {index} @{off:#x})"
        if index in self.bars:
            bar = self.bars[index]
            return bar.read(off, self._clip(bar.size, off, length, op, name))
        if index == v.VFIO_PCI_CONFIG_REGION_INDEX:
            n = self._clip(self.config_size, off, length, op, name)
            return bytes(self.config[off:off + n])
        raise fail(errno.EINVAL, op, name, "region not present")

    def pwrite(self, index: int, off: int, data: bytes, name: str) -> int:
        op = f"pwrite(region {index} @{off:#x})"
        if index in self.bars:
            bar = self.bars[index]
            n = self._clip(bar.size, off, len(data), op, name)
            bar.write(off, data[:n])
            return n
        if index == v.VFIO_PCI_CONFIG_REGION_INDEX:
            n = self._clip(self.config_size, off, len(data), op, name)
            ids = bytes(self.config[0:4])
            self.config[off:off + n] = data[:n]
            self.config[0:4] = ids                 # vendor/device ids are read-only
            return n
        raise fail(errno.EINVAL, op, name, "region not present")

    def mmap(self, index: int, off: int, length: int, prot: int, name: str) -> _mmap.mmap:
        op = f"mmap(region {index} @{off:#x}, {length})"
        bar = self.bars.get(index)
        if bar is None or not bar.mmappable:
            raise fail(errno.EINVAL, op, name, "region is not mmappable")
        phys = -(-bar.size // PAGE_SIZE) * PAGE_SIZE
        if length <= 0 or off % PAGE_SIZE or off + length > phys:
            raise fail(errno.EINVAL, op, name, f"range outside the {phys}-byte BAR")
        return bar.mmap(length, off, prot)

    # -- interrupts ------------------------------------------------------------------------
    def irq_info(self, index: int) -> tuple[int, int]:
        """(flags, count) of IRQ ``index``; vfio-pci: INTx is maskable/automasked, the
        others cannot be resized once enabled."""
        count = {v.VFIO_PCI_INTX_IRQ_INDEX: 1, v.VFIO_PCI_MSI_IRQ_INDEX: 1,
                 v.VFIO_PCI_MSIX_IRQ_INDEX: self.msix_count,
                 v.VFIO_PCI_ERR_IRQ_INDEX: 0 if self.spec.kind == "mdev" else 1,
                 v.VFIO_PCI_REQ_IRQ_INDEX: 1}[index]
        flags = v.VFIO_IRQ_INFO_EVENTFD
        if index == v.VFIO_PCI_INTX_IRQ_INDEX:
            flags |= v.VFIO_IRQ_INFO_MASKABLE | v.VFIO_IRQ_INFO_AUTOMASKED
        else:
            flags |= v.VFIO_IRQ_INFO_NORESIZE
        return flags, count

    def irq_eventfd(self, index: int, vector: int) -> int | None:
        if vector in self.irq_masked.get(index, set()):
            return None
        return self.irq_fds.get(index, {}).get(vector)
