"""``VFIO_DEVICE_FEATURE`` plumbing for a device fd, and the thin typed wrappers the
migration drivers and dirty trackers build on (docs/kernel-contract.md §6.1-§6.3, §6.7-§6.9, §7).

Only primitives live here: one ioctl each, errors named like
``VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE PRE_COPY) on 0000:3b:00.1: EINVAL``. The v2
state machine, recovery and the v1 protocol belong to ``vfiod.migration``; the kernel
composes multi-step transitions itself, so nothing here plans a path (docs/architecture.md §2).
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Sequence

import vfiod.abi.vfio as v
from vfiod.abi.vfio import MigState
from vfiod.errors import KernelError
from vfiod.kernel.ops import KernelOps
from vfiod.vfio import bitmap as bm
from vfiod.vfio.call import check_uint, ioctl, renamed

_GET, _SET, _PROBE = v.VFIO_DEVICE_FEATURE_GET, v.VFIO_DEVICE_FEATURE_SET, v.VFIO_DEVICE_FEATURE_PROBE
#: What a PROBE answers for a feature the device lacks: ENOTTY, or EINVAL from drivers
#: without a device_feature op before 6.18 and for an unsupported direction (§6.1).
_UNSUPPORTED = (errno.ENOTTY, errno.EINVAL)


#: The VFIO_MIGRATION_* flags (§6.2) by the names status, ``vfiod ctl check`` and the
#: stream header give them.
MIGRATION_FLAG_NAMES = ((v.VFIO_MIGRATION_STOP_COPY, "STOP_COPY"), (v.VFIO_MIGRATION_P2P, "P2P"),
                        (v.VFIO_MIGRATION_PRE_COPY, "PRE_COPY"))


def migration_flag_names(flags: int) -> tuple[str, ...]:
    """The VFIO_MIGRATION_* bits set in ``flags``, by name, in the kernel's bit order."""
    return tuple(name for bit, name in MIGRATION_FLAG_NAMES if flags & bit)


def feature_op(feature: int, flags: int, suffix: str = "") -> str:
    """``VFIO_DEVICE_FEATURE(PROBE SET DMA_LOGGING_START)``-style operation name."""
    words = [w for bit, w in ((_PROBE, "PROBE"), (_GET, "GET"), (_SET, "SET")) if flags & bit]
    words.append(v.FEATURE_NAMES.get(feature, f"feature {feature}") + suffix)
    return f"VFIO_DEVICE_FEATURE({' '.join(words)})"


def state_name(state: int) -> str:
    try:
        return MigState(state).name
    except ValueError:
        return str(state)


class DeviceFeatures:
    """Mixed into ``Device``: needs ``kernel``, ``fd`` and ``name``."""

    kernel: KernelOps
    fd: int
    name: str

    # -- generic -------------------------------------------------------------------------
    def _feature(self, feature: int, flags: int, payload: bytes | bytearray, op: str) -> bytes:
        buf = v.feature_buffer(feature, flags, len(payload))
        buf[v.FEATURE_HEADER_SIZE:] = payload
        ioctl(self.kernel, self.fd, v.VFIO_DEVICE_FEATURE, buf, op, self.name)
        return bytes(buf[v.FEATURE_HEADER_SIZE:])

    def feature_probe(self, feature: int, flags: int = _SET) -> bool:
        """Does the device support ``feature`` in the GET/SET directions in ``flags``?
        ENOTTY/EINVAL mean no; any other errno is a real failure and raises."""
        flags |= _PROBE
        try:
            self._feature(feature, flags, b"", feature_op(feature, flags))
        except KernelError as e:
            if e.errno in _UNSUPPORTED:
                return False
            raise
        return True

    def feature_get(self, feature: int, payload_size: int, suffix: str = "") -> bytes:
        """GET ``feature``; returns the ``payload_size`` bytes the kernel wrote."""
        return self._feature(feature, _GET, bytes(payload_size),
                             feature_op(feature, _GET, suffix))

    def feature_set(self, feature: int, payload: bytes | bytearray = b"",
                    suffix: str = "") -> bytes:
        """SET ``feature`` with ``payload``; returns the payload as the kernel left it
        (MIG_DEVICE_STATE and DMA_LOGGING_START copy results back)."""
        return self._feature(feature, _SET, payload, feature_op(feature, _SET, suffix))

    # -- migration v2 (§6.2, §6.3, §6.9) ---------------------------------------------------
    def mig_flags(self) -> int | None:
        """VFIO_MIGRATION_* flags, or None if the device is not migratable (ENOTTY)."""
        try:
            raw = self.feature_get(v.VFIO_DEVICE_FEATURE_MIGRATION,
                                   ctypes.sizeof(v.vfio_device_feature_migration))
        except KernelError as e:
            if e.errno == errno.ENOTTY:
                return None
            raise
        return int(v.vfio_device_feature_migration.from_buffer_copy(raw).flags)

    def set_mig_state(self, state: int) -> int:
        """SET MIG_DEVICE_STATE: the kernel walks the whole path. Returns the new data fd
        (caller owns it) or -1. On failure the errno says why; the device may be anywhere
        on the path or in ERROR: callers must ``get_mig_state()`` next (§6.3)."""
        check_uint("device_state", int(state), 32)
        arg = v.vfio_device_feature_mig_state(device_state=int(state), data_fd=-1)
        out = self.feature_set(v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, bytes(arg),
                               f" {state_name(state)}")
        return int(v.vfio_device_feature_mig_state.from_buffer_copy(out).data_fd)

    def get_mig_state(self) -> MigState | int:
        """GET MIG_DEVICE_STATE: the current state (an int if the kernel answers a value
        this vfiod does not know)."""
        raw = self.feature_get(v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                               ctypes.sizeof(v.vfio_device_feature_mig_state))
        st = int(v.vfio_device_feature_mig_state.from_buffer_copy(raw).device_state)
        try:
            return MigState(st)
        except ValueError:
            return st

    def mig_data_size(self) -> int:
        """GET MIG_DATA_SIZE: the driver's estimate of the STOP_COPY bytes (6.2+)."""
        raw = self.feature_get(v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
                               ctypes.sizeof(v.vfio_device_feature_mig_data_size))
        return int(v.vfio_device_feature_mig_data_size.from_buffer_copy(raw).stop_copy_length)

    # -- migration data fd (§6.7, §6.8) ----------------------------------------------------
    def precopy_info(self, data_fd: int) -> tuple[int, int]:
        """VFIO_MIG_GET_PRECOPY_INFO on the saving data fd → (initial_bytes, dirty_bytes)."""
        arg = v.vfio_precopy_info(argsz=ctypes.sizeof(v.vfio_precopy_info))
        ioctl(self.kernel, data_fd, v.VFIO_MIG_GET_PRECOPY_INFO, arg,
              "VFIO_MIG_GET_PRECOPY_INFO", self.name)
        return int(arg.initial_bytes), int(arg.dirty_bytes)

    def data_read(self, data_fd: int, length: int) -> bytes:
        """read(2) on the data fd; b"" is end of stream only in STOP_COPY (§6.7)."""
        try:
            return self.kernel.read(data_fd, length)
        except KernelError as e:
            raise renamed(e, "read(migration data fd)", self.name) from None

    def data_readinto(self, data_fd: int, buf: bytearray | memoryview) -> int:
        try:
            return self.kernel.readinto(data_fd, buf)
        except KernelError as e:
            raise renamed(e, "read(migration data fd)", self.name) from None

    def data_wait_readable(self, data_fd: int, timeout_s: float) -> bool:
        try:
            return self.kernel.wait_readable(data_fd, timeout_s)
        except KernelError as e:
            raise renamed(e, "poll(migration data fd)", self.name) from None

    def data_write(self, data_fd: int, data: bytes | bytearray | memoryview) -> int:
        try:
            return self.kernel.write(data_fd, data)
        except KernelError as e:
            raise renamed(e, "write(migration data fd)", self.name) from None

    def data_close(self, data_fd: int) -> None:
        try:
            self.kernel.close(data_fd)
        except KernelError as e:
            raise renamed(e, "close(migration data fd)", self.name) from None

    # -- device DMA logging (§7) -----------------------------------------------------------
    def dma_logging_probe(self) -> bool:
        return self.feature_probe(v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, _SET)

    def dma_logging_start(self, ranges: Sequence[tuple[int, int]], page_size: int) -> int:
        """Start logging device DMA writes to ``ranges`` ((iova, length) pairs, aligned to
        ``page_size``); returns the granule the driver chose. E2BIG: too many ranges for
        this driver, merge and retry."""
        if not ranges:
            raise ValueError(f"{feature_op(v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, _SET)} on "
                             f"{self.name}: at least one range is needed")
        check_uint("page_size", page_size)
        arr = (v.vfio_device_feature_dma_logging_range * len(ranges))()
        for slot, (iova, length) in zip(arr, ranges, strict=True):
            slot.iova, slot.length = check_uint("iova", iova), check_uint("length", length)
        ctl = v.vfio_device_feature_dma_logging_control(
            page_size=page_size, num_ranges=len(ranges), ranges=ctypes.addressof(arr))
        out = self.feature_set(v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, bytes(ctl))
        del arr     # the kernel read it during the call; keep it alive until here
        return int(v.vfio_device_feature_dma_logging_control.from_buffer_copy(out).page_size)

    def dma_logging_stop(self) -> None:
        self.feature_set(v.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP)

    def dma_logging_report(self, iova: int, length: int, page_size: int,
                           out: bm.Bitmap | None = None) -> bm.Bitmap:
        """Read-and-clear the device's log for [iova, iova+length) into a zeroed bitmap
        (bit n = page iova + n*page_size). On any error treat the whole log as lost."""
        check_uint("iova", iova), check_uint("length", length)
        check_uint("page_size", page_size)
        op = feature_op(v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, _GET)
        if page_size == 0:
            raise ValueError(f"{op} on {self.name}: page_size must be a power of two >= 4096")
        result = bm.prepare(out, bm.pages(length, page_size), op)
        rep = v.vfio_device_feature_dma_logging_report(
            iova=iova, length=length, page_size=page_size, bitmap=result.ctypes.data)
        self._feature(v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, _GET, bytes(rep), op)
        return result
