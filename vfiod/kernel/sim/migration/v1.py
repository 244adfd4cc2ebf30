"""Migration protocol v1 of a simulated device: the migration region (docs/kernel-contract.md §5).

Region layout: the 32-byte ``vfio_device_migration_info`` register block at offset 0,
then (page aligned, at ``data_offset`` = 4096) a data window of ``spec.extra["v1_window"]``
bytes (default 64 KiB). Region flags READ|WRITE|MMAP|CAPS, capabilities TYPE (type 3,
subtype 1) and SPARSE_MMAP covering only the data window. The window is a real shared
memory file, so ``mmap`` of it returns a real mapping (through ``LinuxKernel``, the one
syscall seam).

Register rules (§5.2, §5.3): each field is reached only by one access of its own width
at its own offset, anything else is EINVAL; pending_bytes and data_offset are read-only.
device_state: writes must keep the reserved bits 3..31 as read (read-modify-write; the
device reports ``spec.extra["v1_reserved"]`` there), must satisfy the VALID rule (101,
111 -> EINVAL) and may not ask for 110 (ERROR is driver-set only); in ERROR every write
is EINVAL until VFIO_DEVICE_RESET, which returns to 001 (RUNNING). This simulator also
refuses 010 -> 011 (back from stop-and-copy to pre-copy) and resuming <-> saving jumps.

Save loop (§5.5): reading data_offset commits the next buffer of the stream into the
window (data_size = its length); reading pending_bytes acknowledges it. Resume loop
(§5.6): write the chunk into the window (pwrite or mmap), then write data_size: the chunk
is consumed before that write returns. Leaving RESUMING validates the stream; a bad
stream fails that write with EINVAL and leaves the device in ERROR (110).

Fault points: ``v1:<STATE>`` on a device_state write (STATE one of STOP, RUNNING,
SAVING, SAVING|RUNNING, RESUMING; an injected EIO leaves ERROR, other errnos the previous
state); ``v1:read_data`` when a save buffer is committed (data_offset read);
``v1:write_data`` when a resume chunk is consumed (data_size write).
"""

from __future__ import annotations

import errno
import mmap as _mmap
import struct
import weakref

import vfiod.abi.v1 as v1
import vfiod.abi.vfio as v
from vfiod.errors import KernelError
from vfiod.kernel.linux import LinuxKernel
from vfiod.kernel.sim.base import FaultInjector, fail
from vfiod.kernel.sim.interfaces import DeviceSpec
from vfiod.kernel.sim.migration.device_model import DeviceModel, extra_int
from vfiod.kernel.sim.migration.stream import LoadSession, SaveSession

PAGE = 4096
DATA_OFFSET = PAGE
_INFO = v1.vfio_device_migration_info
#: offset -> (width, field name) of the register block.
FIELDS: dict[int, tuple[int, str]] = {
    getattr(_INFO, f[0]).offset: (getattr(_INFO, f[0]).size, f[0]) for f in _INFO._fields_
}
_FMT = {4: struct.Struct("<I"), 8: struct.Struct("<Q")}
STATE_NAMES = {
    v1.V1_STATE_STOP: "STOP", v1.V1_STATE_RUNNING: "RUNNING", v1.V1_STATE_SAVING: "SAVING",
    v1.V1_STATE_SAVING | v1.V1_STATE_RUNNING: "SAVING|RUNNING",
    v1.V1_STATE_RESUMING: "RESUMING", v1.V1_STATE_ERROR: "ERROR",
}
RUN, SAVE, RESUME = v1.V1_STATE_RUNNING, v1.V1_STATE_SAVING, v1.V1_STATE_RESUMING


class _Window:
    """The data window's bytes: a memfd shared mapping, created on first use."""

    def __init__(self, size: int, label: str) -> None:
        self.size = size
        self._label = label
        self._linux = LinuxKernel()
        self._fd: int | None = None
        self.map: _mmap.mmap | None = None

    def backing(self) -> _mmap.mmap:
        if self.map is None:
            self._fd = self._linux.memfd_create(self._label, self.size)
            self.map = self._linux.mmap(self._fd, self.size)
            weakref.finalize(self, _close_window, self._linux, self._fd, self.map)
        return self.map

    def mmap(self, length: int, offset: int, prot: int) -> _mmap.mmap:
        self.backing()
        assert self._fd is not None
        return self._linux.mmap(self._fd, length, offset, prot)


def _close_window(linux: LinuxKernel, fd: int, mapping: _mmap.mmap) -> None:
    mapping.close()
    linux.close(fd)


class MigrationRegionV1:
    """``SimRegion`` + ``Resettable``: the v1 migration region of one device."""

    def __init__(self, spec: DeviceSpec, faults: FaultInjector, model: DeviceModel) -> None:
        window = extra_int(spec, "v1_window", 64 * 1024) or 0
        reserved = extra_int(spec, "v1_reserved", 0) or 0
        if window <= 0 or window % PAGE:
            raise ValueError(f"{spec.name}: v1_window must be a positive multiple of {PAGE}")
        if reserved & v1.V1_STATE_MASK or not 0 <= reserved < 1 << 32:
            raise ValueError(f"{spec.name}: v1_reserved {reserved:#x} must only use bits 3..31")
        self.name = spec.name
        self.index = extra_int(spec, "v1_region_index", v.VFIO_PCI_NUM_REGIONS) or 0
        if self.index < v.VFIO_PCI_NUM_REGIONS:
            raise ValueError(f"{spec.name}: v1 region index must be >= 9, not {self.index}")
        self.size = DATA_OFFSET + window
        self.flags = (v.VFIO_REGION_INFO_FLAG_READ | v.VFIO_REGION_INFO_FLAG_WRITE
                      | v.VFIO_REGION_INFO_FLAG_MMAP | v.VFIO_REGION_INFO_FLAG_CAPS)
        self.faults = faults
        self.model = model
        self.window = _Window(window, f"v1-window {spec.name}")
        self._reserved = reserved
        self.precopy_size = spec.precopy_size
        self.device_state = reserved | RUN
        self.data_size = 0
        self._committed = False
        self.saving: SaveSession | None = None
        self.resuming: LoadSession | None = None

    @property
    def bits(self) -> int:
        return self.device_state & v1.V1_STATE_MASK

    # -- SimRegion -------------------------------------------------------------------------
    def caps(self) -> list[bytes]:
        ctype = v.vfio_region_info_cap_type(type=v1.VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
                                            subtype=v1.VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED)
        ctype.header.id, ctype.header.version = v.VFIO_REGION_INFO_CAP_TYPE, 1
        sparse = v.vfio_region_info_cap_sparse_mmap(nr_areas=1)
        sparse.header.id, sparse.header.version = v.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1
        area = v.vfio_region_sparse_mmap_area(offset=DATA_OFFSET, size=self.window.size)
        return [bytes(ctype), bytes(sparse) + bytes(area)]

    def pread(self, length: int, offset: int) -> bytes:
        if offset < DATA_OFFSET:
            width, name = self._field(length, offset, "pread")
            return _FMT[width].pack(self._read_field(name))
        self._check_window(length, offset, "pread")
        off = offset - DATA_OFFSET
        return bytes(self.window.backing()[off:off + length])

    def pwrite(self, data: bytes, offset: int) -> int:
        if offset < DATA_OFFSET:
            width, name = self._field(len(data), offset, "pwrite")
            self._write_field(name, _FMT[width].unpack(data)[0])
            return width
        self._check_window(len(data), offset, "pwrite")
        if self.bits != RESUME:
            raise fail(errno.EINVAL, "pwrite(v1 data window)", self.name,
                       f"device_state {self.bits:03b} is not RESUMING")
        off = offset - DATA_OFFSET
        self.window.backing()[off:off + len(data)] = data
        return len(data)

    def mmap(self, length: int, offset: int, prot: int) -> object:
        if offset < DATA_OFFSET or offset % PAGE or length <= 0 \
                or offset + length > self.size:
            raise fail(errno.EINVAL, "mmap(v1 migration region)", self.name,
                       f"{length}@{offset:#x} is outside the sparse mmap area "
                       f"{self.window.size}@{DATA_OFFSET:#x}")
        return self.window.mmap(length, offset - DATA_OFFSET, prot)

    def _field(self, length: int, offset: int, op: str) -> tuple[int, str]:
        field = FIELDS.get(offset)
        if field is None or field[0] != length:
            raise fail(errno.EINVAL, f"{op}(v1 migration region)", self.name,
                       f"{length} bytes at offset {offset}: each register needs one access "
                       "of its own width at its own offset")
        return field

    def _check_window(self, length: int, offset: int, op: str) -> None:
        if length < 0 or offset + length > self.size:
            raise fail(errno.EINVAL, f"{op}(v1 data window)", self.name,
                       f"{length}@{offset:#x} beyond the {self.size}-byte region")

    # -- registers -------------------------------------------------------------------------
    def _read_field(self, name: str) -> int:
        if name == "device_state":
            return self.device_state
        if name == "reserved":
            return 0
        if name == "pending_bytes":
            self._committed = False           # reading it acknowledges the last buffer
            return self.saving.pending if self.saving is not None else 0
        if name == "data_offset":
            if self.saving is not None and not self._committed:
                self._commit()
            return DATA_OFFSET
        return self.data_size

    def _commit(self) -> None:
        """Fill the window with the next bytes of the stream (§5.5 step 2)."""
        assert self.saving is not None
        self.faults.check("v1:read_data", "pread(v1 data_offset)", self.name)
        win = self.window.backing()
        filled = 0
        while filled < self.window.size:
            data = self.saving.read(self.window.size - filled)
            if not data:
                break
            win[filled:filled + len(data)] = data
            filled += len(data)
        self.data_size = filled
        self._committed = True

    def _write_field(self, name: str, value: int) -> None:
        op = f"pwrite(v1 {name})"
        if name == "reserved":
            return                              # writes ignored (§5.2)
        if name == "device_state":
            self._set_state(value)
            return
        if name != "data_size":
            raise fail(errno.EINVAL, op, self.name, f"{name} is read-only")
        if self.bits != RESUME or self.resuming is None:
            raise fail(errno.EINVAL, op, self.name,
                       f"device_state {self.bits:03b} is not RESUMING")
        if value > self.window.size:
            raise fail(errno.EINVAL, op, self.name,
                       f"data_size {value} > window {self.window.size}")
        self.faults.check("v1:write_data", op, self.name)
        self.data_size = value
        try:
            self.resuming.write(bytes(self.window.backing()[:value]))
        except KernelError as e:
            raise e.with_context(op=op) from None

    def _set_state(self, value: int) -> None:
        op = "pwrite(v1 device_state)"
        cur = self.bits
        new = value & v1.V1_STATE_MASK
        if v1.v1_state_is_error(cur):
            raise fail(errno.EINVAL, op, self.name, "device is in ERROR; only "
                       "VFIO_DEVICE_RESET recovers")
        if value & ~v1.V1_STATE_MASK != self._reserved:
            raise fail(errno.EINVAL, op, self.name,
                       f"reserved bits {value & ~v1.V1_STATE_MASK:#x} differ from "
                       f"{self._reserved:#x}: read-modify-write device_state")
        if not v1.v1_state_valid(new) or v1.v1_state_is_error(new):
            raise fail(errno.EINVAL, op, self.name, f"invalid device_state {new:03b}")
        if new == cur:
            return
        if cur == RESUME and new & SAVE or new == RESUME and cur & SAVE or \
                cur == SAVE and new == SAVE | RUN:
            raise fail(errno.EINVAL, op, self.name,
                       f"device_state {cur:03b} -> {new:03b} is not supported")
        try:
            self.faults.check(f"v1:{STATE_NAMES[new]}", op, self.name)
        except KernelError as e:
            if e.errno == errno.EIO:
                self._enter_error()
            raise
        self._transition(cur, new, op)

    def _transition(self, cur: int, new: int, op: str) -> None:
        if cur == RESUME:
            assert self.resuming is not None
            try:
                self.resuming.finish()
            except KernelError as e:
                self._enter_error()
                raise e.with_context(op=op) from None
            self._end_sessions()
        self.model.running = bool(new & RUN)
        if new & SAVE and not cur & SAVE:
            self.saving = SaveSession(self.model, precopy=bool(new & RUN),
                                      precopy_size=self.precopy_size)
            self._committed = False
        elif new & SAVE:                        # 011 -> 010: stop-and-copy, same session
            assert self.saving is not None
            self.saving.enter_stop_copy()
        elif cur & SAVE:
            self._end_sessions()
        elif new == RESUME:
            self.resuming = LoadSession(self.model, self.name)
        self.device_state = self._reserved | new

    def _end_sessions(self) -> None:
        for session in (self.saving, self.resuming):
            if session is not None:
                session.end()
        self.saving = self.resuming = None
        self._committed = False
        self.data_size = 0

    def _enter_error(self) -> None:
        self._end_sessions()
        self.model.running = False
        self.device_state = self._reserved | v1.V1_STATE_ERROR

    # -- Resettable ------------------------------------------------------------------------
    def reset(self) -> None:
        self._end_sessions()
        self.device_state = self._reserved | RUN
        self.model.power_on()

