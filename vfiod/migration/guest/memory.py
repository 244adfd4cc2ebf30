"""``RamBlock``: one RAM region of a guest, mapped into this process (docs/architecture.md §1 step 3;
docs/kernel-contract.md §3.7 MAP_DMA).

The region is described by a ``RamRegion`` (name, guest-physical address, size: the same
value the stream header carries); the block adds what this process holds for it: the
shared file backing it (a new memfd, a file such as hugetlbfs or /dev/shm opened by
path, or vfiod's own copy of an fd the VMM handed over, docs/architecture.md §8.1, whose
region starts at ``offset`` in the file) and the ``MAP_SHARED`` mapping made through
``KernelOps.mmap``. The mapping's
address is what ``VFIO_IOMMU_MAP_DMA`` is given, so a device DMA write lands in the very
memory the stream reads and writes, and the file is what the digests ``pread`` (holes of
a sparse file read as zeros without being allocated).

The block owns both: ``close`` unmaps, then closes the file.
"""

from __future__ import annotations

import ctypes
import gc
import os

from vfiod.kernel.ops import KernelOps
from vfiod.vfio import RamRegion


class RamBlock:
    """See the module docstring. Build with ``RamBlock.open``."""

    def __init__(self, kernel: KernelOps, region: RamRegion, fd: int, offset: int = 0) -> None:
        """Map ``fd`` (taken over: ``close`` closes it) at ``offset`` for ``region``."""
        self.kernel = kernel
        self.region = region
        self.fd = fd
        #: where the region starts in the file: every pread of the region adds it
        self.offset = offset
        self.mem = kernel.mmap(fd, region.size, offset)
        # The address of the mapping, for MAP_DMA. The ctypes view pins the mmap while it
        # exists (mmap.close() refuses exported buffers), so it is dropped at once.
        anchor = ctypes.c_char.from_buffer(self.mem)
        self.addr = ctypes.addressof(anchor)
        del anchor

    @classmethod
    def open(cls, kernel: KernelOps, region: RamRegion, *, label: str,
             path: str | None = None) -> RamBlock:
        """Back ``region`` with a new sparse memfd named ``label`` (all zero), or with the
        shared file at ``path``, and map it."""
        if path is None:
            fd = kernel.memfd_create(label, region.size)
        else:
            fd = kernel.open(path, os.O_RDWR)
        try:
            return cls(kernel, region, fd)
        except BaseException:
            kernel.close(fd)
            raise

    @classmethod
    def adopt(cls, kernel: KernelOps, region: RamRegion, fd: int, offset: int) -> RamBlock:
        """Back ``region`` with a copy of ``fd`` (handed over by a VMM, already checked)
        from ``offset``: the caller keeps ``fd``; ``close`` closes only the copy."""
        own = kernel.dup(fd)
        try:
            return cls(kernel, region, own, offset)
        except BaseException:
            kernel.close(own)
            raise

    @property
    def name(self) -> str:
        return self.region.name

    @property
    def gpa(self) -> int:
        return self.region.gpa

    @property
    def size(self) -> int:
        return self.region.size

    def view(self) -> memoryview:
        return memoryview(self.mem)

    def close(self) -> None:
        if not self.mem.closed:
            try:
                self.mem.close()
            except BufferError:
                # views handed out (stream, digests) may only be unreachable through a
                # reference cycle that has not been collected yet
                gc.collect()
                self.mem.close()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self.kernel.close(fd)
