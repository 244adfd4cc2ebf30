"""Migration driver for protocol v1: the migration region's register block and data window
(vfio-uapi.md §5; design.md §1.4–§1.6). For 5.8–5.17 kernels and out-of-tree vendor drivers.

* ``device_state`` changes by read-modify-write of the 4-byte register (bits 3–31 are
  reserved and kept), decoded into ``MigState`` by ``v1_codec``. A failed write is followed
  by a read back: ERROR (110) → VFIO_DEVICE_RESET; another state → the named recovery state.
* Every register field is one access of its exact width at its natural offset.
* Save: pending_bytes → data_offset (commits a buffer) → data_size → the data (through the
  region's sparse mmap when an mmappable area covers the buffer, else pread) → pending_bytes
  again (acknowledges it). In pre-copy, pending 0 means "nothing now"; in stop-and-copy the
  loop runs until pending is 0, then the device goes to STOP (000).
* Resume: per chunk, data_offset → write the chunk there → write data_size (the driver
  consumes it before the write returns); chunks keep the source's sizes and order.
  v1 has no validation step: ``load_complete`` only checks that the device is not in
  ERROR and stays RESUMING (stopped); ``resume`` goes RESUMING → RUNNING, as the header says.
* Rollback: ``_RUNNING`` with ``_SAVING`` cleared; from ERROR or RESUMING, reset.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from vfiod.errors import KernelError, MigrationError
from vfiod.migration.device import v1_codec
from vfiod.migration.device.base import DeviceTransitionError, DriverBase, Pending, Phase, Sink
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

    def __init__(self, device: Device, region: RegionInfo) -> None:
        super().__init__(device, 0)
        if region.size < REGISTER_BLOCK or not (region.readable and region.writable):
            raise ValueError(f"{device.name}: v1 migration region {region.index} must be "
                             f"readable, writable and >= {REGISTER_BLOCK} bytes "
                             f"(size {region.size}, flags {region.flags:#x})")
        self.region = region
        self._maps: dict[int, MmapObject] = {}        # area offset -> mmap of that area
        self._map_failed: set[int] = set()
        self.rollback_log: list[str] = []
        self._state = self._read_state()

    @property
    def has_precopy(self) -> bool:
        return True       # every v1 driver must accept 011 (it may offer no data there)

    @property
    def has_p2p(self) -> bool:
        return False

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

    def _read_state(self) -> MigState:
        reg = self._read("device_state")
        try:
            return v1_codec.state_of(reg)
        except ValueError as e:
            raise KernelError(errno.EPROTO, "v1 read device_state", self.device.name,
                              str(e)) from None

    def _read_back(self, rungs: list[str]) -> MigState | None:
        try:
            st = self._read_state()
        except KernelError as e:
            rungs.append(f"read back: {e.errno_name}")
            return None
        rungs.append(f"read back: {v1_codec.bits_name(v1_codec.encode(st))} {st.name}")
        self._state = st
        return st

    # -- the state machine ----------------------------------------------------------------------
    def _write_state(self, target: MigState) -> None:
        reg = self._read("device_state")        # read-modify-write: keep bits 3–31
        self._write("device_state", v1_codec.with_state(reg, target))
        self._state = target

    def set_state(self, target: MigState, recover: MigState | None) -> None:
        """Write ``target``; on failure read back, write ``recover`` (unless already
        there), reset if that fails or the device is in ERROR; raise with every rung."""
        if self._state is MigState.ERROR:
            rungs = [f"device is in ERROR: {target.name} not written"]
            final = self._reset(rungs)
            raise DeviceTransitionError(errno.EIO, self._op(target), self.device.name, rungs,
                                        final, True)
        try:
            self._write_state(target)
        except KernelError as e:
            self._ladder(e, target, recover)

    @staticmethod
    def _op(target: MigState) -> str:
        return f"v1 write device_state={v1_codec.bits_name(v1_codec.encode(target))}"

    _VERB = "write"

    def _apply(self, state: MigState) -> None:
        self._write_state(state)


    def _reset(self, rungs: list[str]) -> MigState | None:
        try:
            self.device.reset()
            rungs.append("VFIO_DEVICE_RESET: ok")
        except KernelError as e:
            rungs.append(f"VFIO_DEVICE_RESET: {e.errno_name}")
        try:
            self._state = self._read_state()
        except KernelError as e:
            self._state = MigState.ERROR
            rungs.append(f"state after reset unknown ({e.errno_name})")
            return None
        rungs.append(f"now {self._state.name}")
        return self._state

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

    def _drain(self, sink: Sink, max_bytes: int | None) -> int:
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

    # -- source hooks -----------------------------------------------------------------------
    def save_setup(self) -> None:
        self._expect("save_setup", Phase.IDLE)
        self._state = self._read_state()
        if self._state is MigState.RUNNING:
            self.set_state(MigState.PRE_COPY, MigState.RUNNING)
        elif self._state is not MigState.STOP:
            raise MigrationError(f"save_setup on {self.device.name}: device is in "
                                 f"{self._state.name}, expected RUNNING or STOP")
        self._phase = Phase.SAVING

    def save_live_pending(self) -> Pending:
        self._expect("save_live_pending", Phase.IDLE, Phase.SAVING, Phase.SAVED)
        if self._state not in (MigState.PRE_COPY, MigState.STOP_COPY):
            return Pending(0, 0, self._phase is Phase.SAVED)
        pending = self._read("pending_bytes")
        # v1 cannot say what will be left after the stop: design.md §4 takes the current
        # pending_bytes as the stop-copy estimate (over-estimating downtime, never under)
        pre = pending if self._state is MigState.PRE_COPY else 0
        return Pending(pre, pending, False)

    def save_live_iterate(self, sink: Sink, max_bytes: int) -> int:
        self._expect("save_live_iterate", Phase.SAVING)
        if max_bytes <= 0:
            raise ValueError(f"save_live_iterate on {self.device.name}: max_bytes must be "
                             f"positive, not {max_bytes}")
        if self._state is not MigState.PRE_COPY:
            return 0
        return self._drain(sink, max_bytes)

    def quiesce_p2p(self) -> None:
        raise MigrationError(f"quiesce_p2p on {self.device.name}: migration v1 has no P2P "
                             "states")

    def save_live_complete_precopy(self, sink: Sink) -> int:
        self._expect("save_live_complete_precopy", Phase.SAVING)
        if self._state is not MigState.STOP_COPY:
            self.set_state(MigState.STOP_COPY, MigState.RUNNING)   # 011/001 -> 010
        total = self._drain(sink, None)
        # drained: 010 -> 000 (the header's "save" sequence ends in _STOP)
        self.set_state(MigState.STOP, None)
        self._phase = Phase.SAVED
        return total

    # -- destination hooks --------------------------------------------------------------------
    def load_setup(self) -> None:
        self._expect("load_setup", Phase.IDLE)
        self._state = self._read_state()
        if self._state not in (MigState.RUNNING, MigState.STOP):
            raise MigrationError(f"load_setup on {self.device.name}: device is in "
                                 f"{self._state.name}, expected RUNNING or STOP")
        self.set_state(MigState.RESUMING, MigState.RUNNING)
        self._phase = Phase.LOADING

    def load_state(self, chunk: bytes | memoryview) -> None:
        self._expect("load_state", Phase.LOADING)
        data = memoryview(chunk).cast("B")
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

    def load_complete(self) -> None:
        self._expect("load_complete", Phase.LOADING)
        rungs: list[str] = []
        st = self._read_back(rungs)
        if st is not MigState.RESUMING:
            final = self._reset(rungs) if st in (None, MigState.ERROR) else st
            raise DeviceTransitionError(errno.EIO, "v1 load_complete", self.device.name,
                                        rungs, final, st in (None, MigState.ERROR))
        self._phase = Phase.LOADED

    def resume(self) -> None:
        self._expect("resume", Phase.LOADED)
        self.set_state(MigState.RUNNING, None)    # 100 -> 001; failure: reset
        self._phase = Phase.RESUMED

    # -- both -------------------------------------------------------------------------------
    def _unmap(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError as e:    # a sink kept a view despite the contract
                log.error("%s: v1 data window still referenced: %s", self.device.name, e)
        self._maps.clear()

    def cleanup(self) -> None:
        self._unmap()
        self._phase = Phase.IDLE

    def rollback(self) -> MigState:
        rungs: list[str] = []
        try:
            reg = self._read("device_state")
        except KernelError as e:
            rungs.append(f"read device_state: {e.errno_name}")
            reg = None
        st: MigState | None = None
        if reg is not None:
            try:
                st = v1_codec.state_of(reg)
                rungs.append(f"read back: {v1_codec.bits_name(reg)} {st.name}")
            except ValueError as e:
                rungs.append(str(e))
        loading = self._phase in (Phase.LOADING, Phase.LOADED, Phase.RESUMED)
        if st is MigState.RUNNING and not loading:
            self._state = st
        elif st is None or st in (MigState.ERROR, MigState.RESUMING) or loading:
            # ERROR: only reset recovers; a destination discards what it loaded
            self._reset(rungs)
        else:
            self._state = st
            try:
                self.set_state(MigState.RUNNING, None)   # _RUNNING set, _SAVING cleared
                rungs.append("write RUNNING: ok")
            except DeviceTransitionError as e:
                rungs.extend(e.rungs)
        self._unmap()
        self.rollback_log = rungs
        self._phase = Phase.IDLE
        if self._state is not MigState.RUNNING:
            raise DeviceTransitionError(errno.EIO, "rollback", self.device.name, rungs,
                                        self._state, True)
        return self._state
