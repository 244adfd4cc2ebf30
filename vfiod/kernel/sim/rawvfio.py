"""Raw-ioctl helpers for tests that drive the simulated kernel below the vfio/ object layer
(simulator tests of this package and of ``sim.migration``): open a device the legacy way
(docs/kernel-contract.md §3.1), map DMA, run ``VFIO_DEVICE_FEATURE`` and ``VFIO_IOMMU_DIRTY_PAGES``.
Everything goes through ``KernelOps`` with the ``vfiod.abi`` structs, exactly as a caller of
the real kernel would; nothing here knows simulator internals.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

import vfiod.abi.vfio as v
from vfiod.kernel.ops import KernelOps


@dataclass
class RawVfio:
    """The three fds of one device opened through its group."""

    kernel: KernelOps
    container: int
    group: int
    device: int

    def close(self) -> None:
        """Device, then group, then container (docs/architecture.md §2)."""
        for fd in (self.device, self.group, self.container):
            self.kernel.close(fd)


def open_device(kernel: KernelOps, dev_root: str, group: int, name: str,
                iommu: int = v.VFIO_TYPE1v2_IOMMU) -> RawVfio:
    container = kernel.open(os.path.join(dev_root, "vfio", "vfio"), os.O_RDWR)
    gfd = kernel.open(os.path.join(dev_root, "vfio", str(group)), os.O_RDWR)
    kernel.ioctl(gfd, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(container))
    kernel.ioctl(container, v.VFIO_SET_IOMMU, iommu)
    dfd = kernel.ioctl(gfd, v.VFIO_GROUP_GET_DEVICE_FD,
                       ctypes.create_string_buffer(name.encode()))
    return RawVfio(kernel, container, gfd, dfd)


def map_dma(kernel: KernelOps, container: int, iova: int, size: int, vaddr: int,
            flags: int = v.VFIO_DMA_MAP_FLAG_READ | v.VFIO_DMA_MAP_FLAG_WRITE) -> None:
    arg = v.vfio_iommu_type1_dma_map(argsz=ctypes.sizeof(v.vfio_iommu_type1_dma_map),
                                     flags=flags, vaddr=vaddr, iova=iova, size=size)
    kernel.ioctl(container, v.VFIO_IOMMU_MAP_DMA, arg)


def unmap_dma(kernel: KernelOps, container: int, iova: int, size: int, flags: int = 0) -> int:
    """Returns the bytes the kernel reports unmapped."""
    arg = v.vfio_iommu_type1_dma_unmap(argsz=ctypes.sizeof(v.vfio_iommu_type1_dma_unmap),
                                       flags=flags, iova=iova, size=size)
    kernel.ioctl(container, v.VFIO_IOMMU_UNMAP_DMA, arg)
    return int(arg.size)


def dirty_pages(kernel: KernelOps, container: int, flags: int) -> None:
    """START or STOP (argsz 8)."""
    arg = v.vfio_iommu_type1_dirty_bitmap(argsz=8, flags=flags)
    kernel.ioctl(container, v.VFIO_IOMMU_DIRTY_PAGES, arg)


def dirty_get_buffer(iova: int, size: int, bitmap: np.ndarray, pgsize: int = 4096,
                     argsz: int = 48) -> bytearray:
    """A GET_BITMAP argument for ``bitmap`` (a caller-zeroed uint64 array)."""
    buf = bytearray(48)
    head = v.vfio_iommu_type1_dirty_bitmap.from_buffer(buf)
    head.argsz = argsz
    head.flags = v.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP
    get = v.vfio_iommu_type1_dirty_bitmap_get.from_buffer(buf, 8)
    get.iova, get.size = iova, size
    get.bitmap.pgsize, get.bitmap.size, get.bitmap.data = pgsize, bitmap.nbytes, bitmap.ctypes.data
    return buf


def dirty_get(kernel: KernelOps, container: int, iova: int, size: int,
              pgsize: int = 4096) -> np.ndarray:
    """GET_BITMAP into a fresh zeroed array (one bit per ``pgsize`` page)."""
    bitmap = np.zeros(max(1, -(-(size // pgsize) // 64)), dtype=np.uint64)
    kernel.ioctl(container, v.VFIO_IOMMU_DIRTY_PAGES, dirty_get_buffer(iova, size, bitmap, pgsize))
    return bitmap


def feature(kernel: KernelOps, device: int, feature_id: int, flags: int,
            payload: bytes | int = 0) -> bytearray:
    """One ``VFIO_DEVICE_FEATURE`` call; ``payload`` is bytes to send or a size to receive.
    Returns the whole buffer (header + payload) as the kernel left it."""
    size = payload if isinstance(payload, int) else len(payload)
    buf = v.feature_buffer(feature_id, flags, size)
    if not isinstance(payload, int):
        buf[v.FEATURE_HEADER_SIZE:] = payload
    kernel.ioctl(device, v.VFIO_DEVICE_FEATURE, buf)
    return buf
