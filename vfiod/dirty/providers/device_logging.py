"""Device DMA logging: ``VFIO_DEVICE_FEATURE_DMA_LOGGING_START/STOP/REPORT`` on every
device of a container (docs/kernel-contract.md §7).

The kernel's START limits are checked here before any ioctl, so a mistake is a clear
error instead of an EINVAL from one device after others already started:

* at least one range, none empty; iova and length aligned to the page size; no overlaps;
  no range ending past 2^64 (the kernel's EINVAL / EOVERFLOW);
* at most ``MAX_RANGES`` (one 4 KiB page of 16-byte entries; more is E2BIG). Too many
  mappings are *merged* to fit, closing the smallest IOVA gaps first: logging a gap that
  holds no mapping costs nothing, since no DMA can land there. A driver may cap lower and
  answer E2BIG; then the list is merged to half the size and START retried.

REPORT reads and clears the log of each device; the devices' bitmaps are OR-ed. Right
after START one page is REPORTed as a probe, so a kernel without REPORT support is found
before the first RAM pass (its bit, if set, is carried into the next real report). It uses
the page size asked for at START (always aligned with the mappings); a driver whose
granule is coarser replicates its bits (§7). EOPNOTSUPP/ENOTTY from START or REPORT mean
"no device logging here" (the 6.12 guest kernel: START succeeds, REPORT says EOPNOTSUPP):
``ProviderUnavailable``, and the tracker falls back to the container's own tracking.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

import numpy as np

from vfiod.dirty.providers.base import (
    Bitmap,
    DmaSpace,
    IovaRange,
    ProviderName,
    check_report_args,
    unavailable,
)
from vfiod.errors import KernelError
from vfiod.vfio.device import Device

NAME = ProviderName.DEVICE_LOGGING
#: PAGE_SIZE / sizeof(struct vfio_device_feature_dma_logging_range) on 4 KiB hosts
MAX_RANGES = 256
_U64_END = 1 << 64


def plan_ranges(ranges: Sequence[IovaRange], page_size: int,
                max_ranges: int = MAX_RANGES) -> list[IovaRange]:
    """Checked, sorted ranges for START, touching ones joined, merged to ``max_ranges``.

    Raises ``ValueError`` naming the offending range for what the kernel would refuse."""
    op = "DMA_LOGGING_START ranges"
    if page_size < 4096 or page_size & (page_size - 1):
        raise ValueError(f"{op}: page size {page_size:#x} must be a power of two >= 4096")
    if max_ranges < 1:
        raise ValueError(f"{op}: max_ranges must be >= 1, got {max_ranges}")
    if not ranges:
        raise ValueError(f"{op}: at least one range is needed (the kernel answers EINVAL)")
    for iova, length in ranges:
        where = f"{op}: range iova {iova:#x} length {length:#x}"
        if iova < 0 or length <= 0:
            raise ValueError(f"{where}: iova must be >= 0 and length > 0")
        if iova % page_size or length % page_size:
            raise ValueError(f"{where}: not aligned to the {page_size:#x}-byte page")
        if iova + length > _U64_END:
            raise ValueError(f"{where}: ends past 2^64 (the kernel answers EOVERFLOW)")
    ordered = sorted(ranges)
    joined: list[list[int]] = []
    for iova, length in ordered:
        if joined and iova < joined[-1][1]:
            prev = joined[-1]
            raise ValueError(f"{op}: range iova {iova:#x} length {length:#x} overlaps the "
                             f"range ending at {prev[1]:#x} (the kernel answers EINVAL)")
        if joined and iova == joined[-1][1]:
            joined[-1][1] = iova + length          # touching: one range
        else:
            joined.append([iova, iova + length])
    if len(joined) > max_ranges:
        joined = _merge_smallest_gaps(joined, max_ranges)
    return [(a, e - a) for a, e in joined]


def _merge_smallest_gaps(spans: list[list[int]], keep: int) -> list[list[int]]:
    """Close the ``len(spans) - keep`` smallest gaps (ties: lowest address first)."""
    starts = np.array([s[0] for s in spans], dtype=np.uint64)
    ends = np.array([s[1] for s in spans], dtype=np.uint64)
    gaps = starts[1:] - ends[:-1]
    close = np.zeros(len(spans) - 1, dtype=bool)
    close[np.argsort(gaps, kind="stable")[:len(spans) - keep]] = True
    out: list[list[int]] = [[int(starts[0]), int(ends[0])]]
    for i in range(1, len(spans)):
        if close[i - 1]:
            out[-1][1] = int(ends[i])
        else:
            out.append([int(starts[i]), int(ends[i])])
    return out


class DeviceLoggingProvider:
    name = NAME
    precise = True

    def __init__(self, space: DmaSpace, devices: Sequence[Device] | None = None,
                 reason: str = "", max_ranges: int = MAX_RANGES) -> None:
        self.space = space
        self.devices = list(space.devices if devices is None else devices)
        self.reason = reason
        self.max_ranges = max_ranges
        self.page_size: int | None = None
        self.granules: dict[str, int] = {}     # what each driver chose (status)
        self.ranges: list[IovaRange] = []
        self._started: list[Device] = []
        #: pages the START probe found dirty (and so cleared): owed to the next report
        self._carried: set[int] = set()

    def start(self, ranges: Sequence[IovaRange], page_size: int) -> int:
        if not self.devices:
            raise ValueError(f"{NAME} on {self.space.name}: no devices to log")
        planned = plan_ranges(ranges, page_size, self.max_ranges)
        while True:
            try:
                for dev in self.devices:
                    self.granules[dev.name] = dev.dma_logging_start(planned, page_size)
                    self._started.append(dev)
                break
            except KernelError as e:
                self._stop_quietly()
                if e.errno == errno.E2BIG and len(planned) > 1:
                    # a driver capping below one page of ranges: merge harder, retry (§7)
                    planned = plan_ranges(planned, page_size, len(planned) // 2)
                    continue
                raise unavailable(NAME, e) from e
        self.ranges = planned
        self.page_size = page_size
        self._probe_report(planned[0][0], page_size)
        return page_size

    def _probe_report(self, iova: int, page_size: int) -> None:
        """REPORT one page right after START, so a kernel that accepts START but cannot
        REPORT (6.12 without CONFIG_IOMMUFD_DRIVER: EOPNOTSUPP) is found before the first
        RAM pass instead of costing the whole container a second pass at the first sync.
        REPORT clears what it reads: a page found dirty is carried into the next report."""
        try:
            for dev in self._started:
                bits = dev.dma_logging_report(iova, page_size, page_size)
                if bits[0] & 1:
                    self._carried.add(iova)
        except KernelError as e:
            self._stop_quietly()
            raise unavailable(NAME, e) from e

    def report(self, iova: int, length: int, out: Bitmap | None = None) -> Bitmap:
        """REPORT from every device, OR-ed into one bitmap (bit i = iova + i*page_size)."""
        pgsize = check_report_args(NAME, iova, length, self.page_size)
        tmp: Bitmap | None = None
        result: Bitmap | None = None
        try:
            for dev in self._started:
                if result is None:
                    result = dev.dma_logging_report(iova, length, pgsize, out)
                else:
                    tmp = dev.dma_logging_report(iova, length, pgsize, tmp)
                    result[:tmp.size] |= tmp
        except KernelError as e:
            raise unavailable(NAME, e) from e
        if result is None:
            raise RuntimeError(f"{NAME} on {self.space.name}: report before start()")
        for page in [p for p in self._carried if iova <= p < iova + length]:
            n = (page - iova) // pgsize
            result[n >> 6] |= np.uint64(1 << (n & 63))
            self._carried.discard(page)
        return result

    def unmap(self, iova: int, size: int) -> Bitmap:
        """Unmap first, then REPORT: the log lives in the device and survives the unmap,
        and once the IOVA is gone the device cannot write there any more, so nothing can
        slip in between reading and unmapping."""
        check_report_args(NAME, iova, size, self.page_size)
        self.space.unmap(iova, size)
        return self.report(iova, size)

    def _stop_quietly(self) -> None:
        """Undo a half-done START; the START error is the one worth reporting."""
        while self._started:
            try:
                self._started.pop().dma_logging_stop()
            except KernelError:
                pass

    def stop(self) -> None:
        """STOP every started device (each one even if another fails; first error raised)."""
        first: KernelError | None = None
        while self._started:
            dev = self._started.pop()
            try:
                dev.dma_logging_stop()
            except KernelError as e:
                first = first or e
        if first is not None:
            raise first
