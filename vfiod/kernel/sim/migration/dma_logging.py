"""Device DMA logging of a simulated device (docs/kernel-contract.md §7): the ``FeatureHandler`` for
VFIO_DEVICE_FEATURE_DMA_LOGGING_START (6, SET), STOP (7, SET) and REPORT (8, GET), and the
``DmaListener`` that records the device's DMA writes while a session is active.

Checks, in the kernel's order (core ``vfio_ioctl_device_feature_logging_*`` first, then
the driver, mlx5 style):

* START: payload < 24 bytes -> EINVAL; num_ranges 0 -> EINVAL; more than
  ``LOG_MAX_RANGES`` (PAGE_SIZE / 16 = 256) -> E2BIG; each range read with
  copy_from_user (NULL -> EFAULT), iova and length aligned to the requested page_size
  -> else EINVAL; iova + length beyond 2^64 - 1 -> EOVERFLOW; overlapping ranges ->
  EINVAL. Then the driver: page_size not a power of two >= 4096 or a zero-length range ->
  EINVAL; a session already active -> EINVAL (mlx5: ``log_active``); more ranges than
  ``spec.extra["dma_logging_max_ranges"]`` -> E2BIG (drivers may cap lower). The chosen
  granule (= the requested page_size) is written back into ``page_size``.
* STOP: no payload; always succeeds (STOP without a session is a no-op, as in mlx5).
* REPORT: payload < 32 -> EINVAL; page_size not a power of two >= 4096 -> EINVAL;
  iova + length overflow -> EOVERFLOW; ``spec.extra["dma_logging_report_errno"]`` (the
  6.12 kernel without CONFIG_IOMMUFD_DRIVER answers EOPNOTSUPP here); a NULL bitmap ->
  EFAULT; no active session -> EINVAL. Reads and clears: bit n covers
  ``iova + n * page_size`` (relative to the report's iova) and is ORed into the caller's
  bitmap word by word with copy_from_user/copy_to_user, so the caller must zero it.

A session survives VFIO_DEVICE_RESET (drivers keep their tracker across a reset) and
ends when the device fd is last closed (``on_close``).
"""

from __future__ import annotations

import ctypes
import errno
import struct

import vfiod.abi.vfio as v
from vfiod.kernel.sim.base import copy_from_user, copy_to_user, fail
from vfiod.kernel.sim.interfaces import DeviceSpec
from vfiod.kernel.sim.migration.device_model import extra_int

PAGE_SIZE = 4096
LOG_MAX_RANGES = PAGE_SIZE // ctypes.sizeof(v.vfio_device_feature_dma_logging_range)
U64_MAX = (1 << 64) - 1
_WORD = struct.Struct("<Q")
_CONTROL = v.vfio_device_feature_dma_logging_control
_RANGE = v.vfio_device_feature_dma_logging_range
_REPORT = v.vfio_device_feature_dma_logging_report


def _aligned(x: int, a: int) -> bool:
    """The kernel's IS_ALIGNED on u64 values (also for a page_size that is not a power of
    two, which the core does not reject before the driver sees it)."""
    return x & ((a - 1) & U64_MAX) == 0


def _valid_page_size(ps: int) -> bool:
    return ps >= PAGE_SIZE and ps & (ps - 1) == 0


class DmaLogging:
    """FeatureHandler + DmaListener + Closable for one device; see the module docstring."""

    feature_ids: tuple[int, ...] = (v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
                                    v.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
                                    v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT)

    def __init__(self, spec: DeviceSpec) -> None:
        self.name = spec.name
        self.max_ranges = extra_int(spec, "dma_logging_max_ranges", LOG_MAX_RANGES) or 0
        self.report_errno = extra_int(spec, "dma_logging_report_errno", None)
        self.active = False
        self.granule = PAGE_SIZE
        self.ranges: list[tuple[int, int]] = []     # (iova, length), sorted
        self.dirty: set[int] = set()                # dirty granule numbers (iova // granule)

    # -- FeatureHandler --------------------------------------------------------------------
    def directions(self, feature: int) -> int:
        if feature == v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT:
            return v.VFIO_DEVICE_FEATURE_GET
        return v.VFIO_DEVICE_FEATURE_SET

    def handle(self, feature: int, flags: int, payload: memoryview) -> None:
        if feature == v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START:
            self._start(payload)
        elif feature == v.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP:
            self.stop()
        else:
            self._report(payload)

    # -- START / STOP ----------------------------------------------------------------------
    def _start(self, payload: memoryview) -> None:
        op = "VFIO_DEVICE_FEATURE(SET DMA_LOGGING_START)"
        size = ctypes.sizeof(_CONTROL)
        if len(payload) < size:
            raise fail(errno.EINVAL, op, self.name, f"payload {len(payload)} < {size} bytes")
        control = _CONTROL.from_buffer_copy(bytes(payload[:size]))
        n, ps = control.num_ranges, control.page_size
        if n == 0:
            raise fail(errno.EINVAL, op, self.name, "num_ranges is 0")
        if n > LOG_MAX_RANGES:
            raise fail(errno.E2BIG, op, self.name, f"{n} ranges > {LOG_MAX_RANGES}")
        rsize = ctypes.sizeof(_RANGE)
        raw = copy_from_user(control.ranges, n * rsize, op)
        ranges: list[tuple[int, int]] = []
        for i in range(n):
            r = _RANGE.from_buffer_copy(raw, i * rsize)
            if not (_aligned(r.iova, ps) and _aligned(r.length, ps)):
                raise fail(errno.EINVAL, op, self.name, f"range {i} ({r.iova:#x}+"
                           f"{r.length:#x}) not aligned to page_size {ps:#x}")
            if r.iova + r.length > U64_MAX:
                raise fail(errno.EOVERFLOW, op, self.name,
                           f"range {i} ({r.iova:#x}+{r.length:#x}) overflows")
            for j, (iova, length) in enumerate(ranges):
                if r.iova < iova + length and iova < r.iova + r.length:
                    raise fail(errno.EINVAL, op, self.name, f"range {i} overlaps range {j}")
            ranges.append((r.iova, r.length))
        # -- what the driver's log_start checks -------------------------------------------
        if not _valid_page_size(ps):
            raise fail(errno.EINVAL, op, self.name,
                       f"page_size {ps:#x} is not a power of two >= {PAGE_SIZE}")
        if any(length == 0 for _, length in ranges):
            raise fail(errno.EINVAL, op, self.name, "a range has length 0")
        if self.active:
            raise fail(errno.EINVAL, op, self.name, "DMA logging is already active; "
                       "DMA_LOGGING_STOP first")
        if n > self.max_ranges:
            raise fail(errno.E2BIG, op, self.name,
                       f"{n} ranges > this device's limit of {self.max_ranges}")
        self.active = True
        self.granule = ps
        self.ranges = sorted(ranges)
        self.dirty = set()
        control.page_size = self.granule          # out: the granule the device chose
        payload[:size] = bytes(control)

    def stop(self) -> None:
        self.active = False
        self.ranges = []
        self.dirty = set()

    # -- REPORT ----------------------------------------------------------------------------
    def _report(self, payload: memoryview) -> None:
        op = "VFIO_DEVICE_FEATURE(GET DMA_LOGGING_REPORT)"
        size = ctypes.sizeof(_REPORT)
        if len(payload) < size:
            raise fail(errno.EINVAL, op, self.name, f"payload {len(payload)} < {size} bytes")
        rep = _REPORT.from_buffer_copy(bytes(payload[:size]))
        iova, length, ps = rep.iova, rep.length, rep.page_size
        if not _valid_page_size(ps):
            raise fail(errno.EINVAL, op, self.name,
                       f"page_size {ps:#x} is not a power of two >= {PAGE_SIZE}")
        if iova + length > U64_MAX:
            raise fail(errno.EOVERFLOW, op, self.name, f"{iova:#x}+{length:#x} overflows")
        if self.report_errno is not None:
            raise fail(self.report_errno, op, self.name, "iova_bitmap support missing "
                       "in this kernel (CONFIG_IOMMUFD_DRIVER)")
        if rep.bitmap == 0 and length:
            raise fail(errno.EFAULT, op, self.name, "NULL bitmap pointer")
        if not self.active:
            raise fail(errno.EINVAL, op, self.name, "DMA logging is not active")
        words: dict[int, int] = {}
        g = self.granule
        end = iova + length
        for page in sorted(p for p in self.dirty if p * g < end and (p + 1) * g > iova):
            lo, hi = max(page * g, iova), min((page + 1) * g, end)
            for bit in range((lo - iova) // ps, (hi - 1 - iova) // ps + 1):
                words[bit // 64] = words.get(bit // 64, 0) | 1 << (bit % 64)
            if iova <= page * g and (page + 1) * g <= end:
                self.dirty.discard(page)          # read-and-clear what was fully reported
        for word, bits in sorted(words.items()):
            addr = rep.bitmap + 8 * word
            old = _WORD.unpack(copy_from_user(addr, 8, op))[0]
            copy_to_user(addr, _WORD.pack(old | bits), op)

    # -- DmaListener / Closable ------------------------------------------------------------
    def on_dma_write(self, iova: int, length: int) -> None:
        """The device wrote ``length`` bytes at ``iova``: mark every tracked granule."""
        if not self.active or length <= 0:
            return
        g = self.granule
        end = iova + length
        for r_iova, r_len in self.ranges:
            lo, hi = max(iova, r_iova), min(end, r_iova + r_len)
            if lo < hi:
                self.dirty.update(range(lo // g, (hi - 1) // g + 1))

    def on_close(self) -> None:
        self.stop()
