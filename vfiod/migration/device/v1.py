"""Migration driver for protocol v1: the migration region's register block and data window
(docs/kernel-contract.md §5; docs/architecture.md §1.4–§1.6). For 5.8–5.17 kernels and out-of-tree vendor drivers.

* ``device_state`` changes by read-modify-write of the 4-byte register (bits 3–31 are
  reserved and kept), decoded into ``MigState`` by ``v1_codec``. What follows a failed
  write (read back; ERROR (110) → VFIO_DEVICE_RESET; else the named recovery state) and
  rollback (``_RUNNING`` with ``_SAVING`` cleared; from ERROR or RESUMING, reset) are the
  shared recovery sequence of ``base``; rungs say "write" and show the bits.
* Every register field is one access of its exact width at its natural offset.
* Save: pending_bytes → data_offset (commits a buffer) → data_size → the data (through the
  region's sparse mmap when an mmappable area covers the buffer, else pread) → pending_bytes
  again (acknowledges it). In pre-copy, pending 0 means "nothing now"; in stop-and-copy the
  loop runs until pending is 0, then the device goes to STOP (000).
* Resume: per chunk, data_offset → write the chunk there → write data_size (the driver
  consumes it before the write returns); chunks keep the source's sizes and order.
  v1 has no validation step: ``load_complete`` only checks that the device is not in
  ERROR and stays RESUMING (stopped); ``resume`` goes RESUMING → RUNNING, as the header says.
* The data window's mappings are the v1 data session: released by cleanup, rollback and
  reset.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from vfiod.errors import KernelError
from vfiod.migration.device import v1_codec
from vfiod.migration.device.base import DriverBase
from vfiod.migration.device.errors import DeviceTransitionError
from vfiod.migration.device.protocol import DeviceDataSink, Pending
from vfiod.migration.states import MigState

if TYPE_CHECKING:
    from mmap import mmap as MmapObject

    from vfiod.vfio.device import Device
    from vfiod.vfio.regions import RegionInfo

log = logging.getLogger(__name__)

#: The register block is 32 bytes; a region smaller than that cannot be v1.
REGISTER_BLOCK = 32


class V1Driver(DriverBase):
    """A v1 device whose migration region is ``region`` (TYPE cap 3/1)."""

    protocol = "v1"
    _VERB = "write"
    # v1 drivers only enter _RESUMING from a stopped or running device (no path finding)
    _LOAD_FROM = frozenset({MigState.RUNNING, MigState.STOP})

    def __init__(self, device: Device, region: RegionInfo) -> None:
        if region.size < REGISTER_BLOCK or not (region.readable and region.writable):
            raise ValueError(f"{device.name}: v1 migration region {region.index} must be "
                             f"readable, writable and >= {REGISTER_BLOCK} bytes "
                             f"(size {region.size}, flags {region.flags:#x})")
        self.region = region
        self._maps: dict[int, MmapObject] = {}        # area offset -> mmap of that area
        self._map_failed: set[int] = set()
        super().__init__(device, 0)                   # v1 has no VFIO_MIGRATION_* flags

    @property
    def has_precopy(self) -> bool:
        return True       # every v1 driver must accept 011 (it may offer no data there)

    @property
    def has_p2p(self) -> bool:
        return False

    @property
    def capability_names(self) -> tuple[str, ...]:
        return ("V1_REGION",)

    # -- register access ----------------------------------------------------------------------
    def _read(self, name: str) -> int:
        f = v1_codec.FIELDS[name]
        try:
            raw = self.device.read_region(self.region.index, f.offset, f.size)
        except KernelError as e:
            raise e.with_context(op=f"v1 read {name}") from None
        return f.unpack(raw)

    def _write(self, name: str, value: int) -> None:
        f = v1_codec.FIELDS[name]
        try:
            self.device.write_region(self.region.index, f.offset, f.pack(value))
        except KernelError as e:
            shown = (f"{v1_codec.bits_name(value)} [{value:#x}]" if name == "device_state"
                     else f"{value:#x}")
            raise e.with_context(op=f"v1 write {name}={shown}") from None

    # -- the state machine ----------------------------------------------------------------------
    def _read_state(self) -> MigState:
        reg = self._read("device_state")
        try:
            return v1_codec.state_of(reg)
        except ValueError as e:
            raise KernelError(errno.EPROTO, "v1 read device_state", self.device.name,
                              str(e)) from None

    def _request(self, state: MigState) -> int:
        reg = self._read("device_state")        # read-modify-write: keep bits 3–31
        self._write("device_state", v1_codec.with_state(reg, state))
        return -1                               # v1 has no data fd

    def _op(self, target: MigState) -> str:
        return f"v1 write device_state={v1_codec.bits_name(v1_codec.encode(target))}"

    def _state_label(self, state: MigState) -> str:
        return f"{v1_codec.bits_name(v1_codec.encode(state))} {state.name}"

    # -- the data window ---------------------------------------------------------------------
    def _window(self, offset: int, size: int) -> memoryview | None:
        """A view of [offset, offset+size) through the region's mmap, if an mmappable area
        covers it entirely (mapped once per area); None → use pread/pwrite."""
        for area, length in self.region.mmap_areas():
            if not (area <= offset and offset + size <= area + length):
                continue
            if area in self._map_failed:
                return None
            mm = self._maps.get(area)
            if mm is None:
                try:
                    mm = self.device.mmap_region(self.region.index, area, length)
                except (KernelError, ValueError) as e:
                    log.warning("%s: v1 data window mmap failed, using pread: %s",
                                self.device.name, e)
                    self._map_failed.add(area)
                    return None
                self._maps[area] = mm
            return memoryview(mm)[offset - area: offset - area + size]
        return None

    def _check_buffer(self, offset: int, size: int) -> None:
        if offset < REGISTER_BLOCK or offset + size > self.region.size:
            raise KernelError(errno.EPROTO, "v1 data_offset/data_size", self.device.name,
                              f"buffer [{offset:#x}, +{size:#x}) is outside the data section "
                              f"of the {self.region.size:#x}-byte region")

    def _drain(self, sink: DeviceDataSink, max_bytes: int | None) -> int:
        """The save loop; ``max_bytes`` None: until pending_bytes is 0 (stop-and-copy)."""
        total = 0
        while max_bytes is None or total < max_bytes:
            pending = self._read("pending_bytes")     # also acknowledges the last buffer
            if pending == 0:
                break
            offset = self._read("data_offset")        # commits the driver to a buffer
            size = self._read("data_size")
            if size == 0:
                if max_bytes is None:
                    raise KernelError(errno.EPROTO, "v1 read data_size", self.device.name,
                                      f"pending_bytes is {pending} but the buffer is empty")
                break
            self._check_buffer(offset, size)
            view = self._window(offset, size)
            if view is not None:
                try:
                    sink(view)
                finally:
                    view.release()   # the sink had to copy; the mapping stays ours
            else:
                try:
                    data = self.device.read_region(self.region.index, offset, size)
                except KernelError as e:
                    raise e.with_context(op="v1 read data") from None
                sink(data)
            total += size
        return total

    # -- source data ------------------------------------------------------------------------
    def _pending(self) -> Pending:
        if self._state not in (MigState.PRE_COPY, MigState.STOP_COPY):
            return Pending(0, 0, False)
        pending = self._read("pending_bytes")
        # v1 cannot say what will be left after the stop: docs/architecture.md §4 takes the current
        # pending_bytes as the stop-copy estimate (over-estimating downtime, never under)
        pre = pending if self._state is MigState.PRE_COPY else 0
        return Pending(pre, pending, False)

    def _read_precopy(self, sink: DeviceDataSink, max_bytes: int) -> int:
        return self._drain(sink, max_bytes)

    def _read_stopcopy(self, sink: DeviceDataSink) -> int:
        total = self._drain(sink, None)
        # drained: 010 -> 000 (the header's "save" sequence ends in _STOP)
        self.set_state(MigState.STOP, None)
        return total

    # -- destination data ---------------------------------------------------------------------
    def _write_chunk(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            offset = self._read("data_offset")
            # a destination window smaller than the source's chunk: split it
            piece = data[pos:pos + max(0, self.region.size - offset)]
            self._check_buffer(offset, max(1, len(piece)))
            view = self._window(offset, len(piece))
            if view is not None:
                try:
                    view[:] = piece
                finally:
                    view.release()
            else:
                try:
                    self.device.write_region(self.region.index, offset, piece)
                except KernelError as e:
                    raise e.with_context(op="v1 write data") from None
            self._write("data_size", len(piece))      # the driver consumes it now
            pos += len(piece)

    def _validate_loaded(self) -> None:
        # v1 has no validation step: the device must not be in ERROR and stay RESUMING
        rungs: list[str] = []
        st = self._read_back(rungs)
        if st is not MigState.RESUMING:
            final = self._reset(rungs) if st in (None, MigState.ERROR) else st
            raise DeviceTransitionError(errno.EIO, "v1 load_complete", self.device.name,
                                        rungs, final,
                                        st in (None, MigState.ERROR) and self.allow_reset)

    def _end_data_session(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError as e:    # a sink kept a view despite the contract
                log.error("%s: v1 data window still referenced: %s", self.device.name, e)
        self._maps.clear()
