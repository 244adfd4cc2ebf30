"""The guest a migration moves: its RAM, its DMA containers, its devices, its run state
(design.md §1 steps 2-4; vfio-uapi.md §3.1 container/group/device, §3.7 MAP_DMA).

A ``Guest`` owns

* RAM regions: each a shared memory file (a memfd here, or an fd a VMM handed over) of
  ``size`` bytes at guest-physical address ``gpa``, mapped into this process through
  ``KernelOps.mmap``. The mapping's address is what ``VFIO_IOMMU_MAP_DMA`` is given, so a
  device DMA write lands in the very memory the stream reads and writes;
* containers (type1v2): the groups attached to each, the IOVA -> guest mappings made on it
  (default: every RAM region at iova == gpa), and the devices opened through it;
* devices: the vfio ``Device``, the migration driver ``probe`` chose, and the per-device
  ``pre_copy_dirty_page_tracking`` flag (QEMU's ``x-pre-copy-dirty-page-tracking``);
* the dirty tracker over all its containers (``make_tracker``, design.md §3), which
  reads each device's migration state from its driver for the opt-out;
* the run state (``GuestState``) with handlers: pausing the guest calls every handler
  before ``pause`` returns, so whatever runs the guest (vCPUs, a simulated workload) has
  stopped writing by then.

Everything goes through ``KernelOps``: the same class serves the real host and the
simulated one. fds close device -> group -> container, then the RAM mappings and files.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from vfiod.abi.vfio import VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY
from vfiod.dirty.providers.base import DmaSpace
from vfiod.dirty.tracker import DirtyTracker
from vfiod.dirty.tracker_layout import GuestRegion, IovaMapping, TrackedContainer
from vfiod.errors import KernelError, MigrationError
from vfiod.kernel.ops import KernelOps
from vfiod.migration.device.base import MigrationDriver, probe
from vfiod.migration.states import GuestState, MigState
from vfiod.migration.stream.header import DeviceInfo, RamRegion
from vfiod.migration.stream.ram import GuestRam
from vfiod.vfio import Container, Device, Group, HostPaths
from vfiod.vfio.discovery import discover_device

#: (old, new) run state; called synchronously by ``Guest.set_run_state``.
RunStateHandler = Callable[[GuestState, GuestState], None]


@dataclass(frozen=True)
class RamSpec:
    """One RAM region of a guest: ``size`` bytes at guest-physical ``gpa``."""

    name: str
    gpa: int
    size: int


class RamBlock:
    """One RAM region mapped into this process (MAP_SHARED over its file)."""

    def __init__(self, kernel: KernelOps, spec: RamSpec, fd: int, owned: bool) -> None:
        self.kernel = kernel
        self.spec = spec
        self.fd = fd
        self.owned = owned              # vfiod created the file (closes it on release)
        self.mem = kernel.mmap(fd, spec.size)
        # The address of the mapping, for MAP_DMA. The ctypes view pins the mmap while it
        # exists (mmap.close() refuses exported buffers), so it is dropped at once.
        anchor = ctypes.c_char.from_buffer(self.mem)
        self.addr = ctypes.addressof(anchor)
        del anchor

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def gpa(self) -> int:
        return self.spec.gpa

    @property
    def size(self) -> int:
        return self.spec.size

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
        if self.owned and self.fd >= 0:
            fd, self.fd = self.fd, -1
            self.kernel.close(fd)


@dataclass
class GuestDevice:
    name: str
    device: Device
    driver: MigrationDriver
    container: str
    pre_copy_dirty_page_tracking: bool = True
    identity: dict[str, str] = field(default_factory=dict)
    dma_logging: bool = False

    def info(self) -> DeviceInfo:
        """The device as the stream header and preflight describe it."""
        d = self.driver
        flags = getattr(d, "flags", 0) if d.protocol == "v2" else 0
        caps = [name for bit, name in ((VFIO_MIGRATION_STOP_COPY, "STOP_COPY"),
                                       (VFIO_MIGRATION_P2P, "P2P"),
                                       (VFIO_MIGRATION_PRE_COPY, "PRE_COPY")) if flags & bit]
        if d.protocol == "v1":
            caps.append("V1_REGION")
        if self.dma_logging:
            caps.append("DMA_LOGGING")
        return DeviceInfo(self.name, d.protocol, int(flags), dict(self.identity), tuple(caps))


@dataclass
class GuestContainer:
    name: str
    container: Container
    mappings: list[IovaMapping] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    #: dirty providers not to use here (``TrackedContainer.disable``)
    disable: tuple[str, ...] = ()


class Guest:
    """See the module docstring. Build with ``Guest.create`` (fresh zeroed RAM)."""

    def __init__(self, kernel: KernelOps, name: str, page_size: int = 4096,
                 paths: HostPaths | None = None) -> None:
        if page_size < 4096 or page_size & (page_size - 1):
            raise ValueError(f"guest {name}: page size {page_size:#x} must be a power of "
                             "two >= 4096")
        self.kernel = kernel
        self.name = name
        self.page_size = page_size
        self.paths = paths or HostPaths()
        self.ram: list[RamBlock] = []
        self.containers: list[GuestContainer] = []
        self.devices: list[GuestDevice] = []
        self.run_state = GuestState.RUNNING
        #: the guest's dirty tracker (``make_tracker``); a migration starts and stops it
        self.tracker: DirtyTracker | None = None
        self._handlers: list[RunStateHandler] = []
        self._state_lock = threading.Lock()
        self.closed = False

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def create(cls, kernel: KernelOps, name: str, ram: Sequence[RamSpec], *,
               page_size: int = 4096, paths: HostPaths | None = None) -> Guest:
        """A guest whose RAM regions are new sparse memfds (all zero)."""
        g = cls(kernel, name, page_size, paths)
        try:
            for spec in ram:
                g.add_ram(spec)
        except BaseException:
            g.close()
            raise
        return g

    def add_ram(self, spec: RamSpec, fd: int | None = None) -> RamBlock:
        """Add a RAM region: a new memfd, or ``fd`` (a file a VMM handed over, not owned)."""
        ps = self.page_size
        if spec.size <= 0 or spec.gpa % ps or spec.size % ps:
            raise ValueError(f"guest {self.name}: RAM region {spec.name!r} gpa {spec.gpa:#x} "
                             f"size {spec.size:#x} must be positive multiples of {ps:#x}")
        for b in self.ram:
            if b.name == spec.name:
                raise ValueError(f"guest {self.name}: RAM region {spec.name!r} exists")
            if spec.gpa < b.gpa + b.size and b.gpa < spec.gpa + spec.size:
                raise ValueError(f"guest {self.name}: RAM region {spec.name!r} overlaps "
                                 f"{b.name!r}")
        owned = fd is None
        if fd is None:
            fd = self.kernel.memfd_create(f"vfiod-{self.name}-{spec.name}", spec.size)
        try:
            block = RamBlock(self.kernel, spec, fd, owned)
        except BaseException:
            if owned:
                self.kernel.close(fd)
            raise
        self.ram.append(block)
        self.ram.sort(key=lambda b: b.gpa)
        return block

    def add_container(self, name: str, groups: Sequence[int], *,
                      devices: Sequence[str] | None = None,
                      maps: Sequence[tuple[int, int]] | None = None,
                      pre_copy_dirty_page_tracking: Mapping[str, bool] | None = None,
                      disable: Sequence[str] = ()) -> GuestContainer:
        """Open a type1v2 container, attach ``groups``, open ``devices`` (default: every
        device sysfs lists in those groups), probe their migration drivers and map guest
        RAM for DMA: ``maps`` = (gpa, size) ranges inside RAM regions at iova == gpa
        (default: every region)."""
        if any(c.name == name for c in self.containers):
            raise ValueError(f"guest {self.name}: container {name!r} exists")
        c = Container.open(self.kernel, self.paths)
        gc = GuestContainer(name, c, disable=tuple(disable))
        self.containers.append(gc)
        opt = dict(pre_copy_dirty_page_tracking or {})
        for number in groups:
            grp = Group.open(self.kernel, self.paths, number)
            try:
                grp.set_container(c)
            except BaseException:
                grp.close()
                raise
            if c.iommu_type is None:
                c.set_iommu()
            members = self._group_devices(number)
            for dev_name in members if devices is None else [n for n in devices
                                                             if n in members]:
                self._open_device(gc, grp, dev_name, opt.pop(dev_name, True))
        missing = [n for n in devices or () if n not in gc.devices]
        if missing:
            raise ValueError(f"guest {self.name}: devices {missing} are not in groups "
                             f"{list(groups)}")
        if opt:
            raise ValueError(f"guest {self.name}: pre_copy_dirty_page_tracking names "
                             f"devices not in container {name}: {sorted(opt)}")
        for gpa, size in (maps if maps is not None else [(b.gpa, b.size) for b in self.ram]):
            self.map_dma(gc, gpa, size)
        return gc

    def _group_devices(self, number: int) -> list[str]:
        path = os.path.join(self.paths.iommu_group_dir(number), "devices")
        return self.kernel.listdir(path)

    def _open_device(self, gc: GuestContainer, grp: Group, name: str,
                     pre_copy: bool) -> GuestDevice:
        if any(d.name == name for d in self.devices):
            raise ValueError(f"guest {self.name}: device {name} is already open")
        dev = grp.get_device(name)
        identity: dict[str, str] = {}
        found = discover_device(self.kernel, name, self.paths)
        for key in ("kind", "driver", "mdev_type"):
            val = getattr(found, key)
            if val is not None:
                identity[key] = str(val)
        for key in ("vendor", "device"):
            val = getattr(found, key)
            if val is not None:
                identity[key] = f"{val:#06x}"
        try:
            logging = dev.dma_logging_probe()
        except KernelError:
            logging = False
        driver = self._claim_running(name, dev)
        gd = GuestDevice(name, dev, driver, gc.name, pre_copy, identity, logging)
        gc.devices.append(name)
        self.devices.append(gd)
        return gd

    @staticmethod
    def _claim_running(name: str, dev: Device) -> MigrationDriver:
        """A device vfiod claims must be RUNNING. Closing a device fd does not always
        return it there (the mtty sample keeps STOP across close and reopen, seen on
        6.12), so a device left stopped or mid-session by a previous owner is reset
        (VFIO_DEVICE_RESET: back to RUNNING, any data session dropped, vfio-uapi.md
        §3.5) instead of being migrated from the wrong state."""
        driver = probe(dev)                 # reads the device's state back
        state = driver.state()
        if state is MigState.RUNNING:
            return driver
        try:
            dev.reset()
        except KernelError as e:
            raise KernelError(e.errno, e.op, name,
                              f"device is in {state.name}, not RUNNING, and reset failed") from e
        driver = probe(dev)
        if driver.state() is not MigState.RUNNING:
            raise MigrationError(f"{name}: device is in {driver.state().name} after "
                                 "VFIO_DEVICE_RESET, not RUNNING; refusing to claim it")
        return driver

    def map_dma(self, gc: GuestContainer, gpa: int, size: int) -> IovaMapping:
        """MAP_DMA guest [gpa, gpa+size) at iova == gpa on ``gc``."""
        block = self.block_at(gpa)
        if gpa + size > block.gpa + block.size or size <= 0:
            raise ValueError(f"guest {self.name}: DMA map {gpa:#x}+{size:#x} is not inside "
                             f"RAM region {block.name}")
        gc.container.map_dma(gpa, block.addr + gpa - block.gpa, size)
        m = IovaMapping(gpa, size, gpa)
        gc.mappings.append(m)
        return m

    # -- lookups --------------------------------------------------------------------------
    def device(self, name: str) -> GuestDevice:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(f"guest {self.name} has no device {name!r}; has "
                       f"{[d.name for d in self.devices]}")

    def block_at(self, gpa: int) -> RamBlock:
        for b in self.ram:
            if b.gpa <= gpa < b.gpa + b.size:
                return b
        raise ValueError(f"guest {self.name}: guest address {gpa:#x} is not in RAM")

    @property
    def ram_bytes(self) -> int:
        return sum(b.size for b in self.ram)

    def ram_regions(self) -> tuple[RamRegion, ...]:
        return tuple(RamRegion(b.name, b.gpa, b.size) for b in self.ram)

    def guest_ram(self, writable: bool = False) -> GuestRam:
        """The stream's view of this RAM (a destination writes straight into it)."""
        return GuestRam(self.page_size, self.ram_regions(), [b.view() for b in self.ram],
                        writable=writable)

    def device_infos(self) -> tuple[DeviceInfo, ...]:
        return tuple(d.info() for d in self.devices)

    def device_states(self) -> dict[str, MigState]:
        return {d.name: d.driver.state() for d in self.devices}

    def make_tracker(self, clock: Callable[[], float] | None = None) -> DirtyTracker:
        """The guest's dirty tracker: every container with its devices' opt-out flags; the
        opt-out reads the devices' migration states from their drivers."""
        regions = [GuestRegion(b.gpa, b.size, b.name) for b in self.ram]
        tracked = []
        for con in self.containers:
            devs = [self.device(n) for n in con.devices]
            space = DmaSpace(con.name, [d.device for d in devs], type1=con.container)
            tracked.append(TrackedContainer(
                space, list(con.mappings),
                {d.name: d.pre_copy_dirty_page_tracking for d in devs}, con.disable))
        kwargs = {"clock": clock} if clock is not None else {}
        if self.tracker is not None and self.tracker.running:
            raise RuntimeError(f"guest {self.name}: its dirty tracker is running (another "
                               "migration?)")
        self.tracker = DirtyTracker(regions, tracked, self.page_size,
                                    device_states=lambda n: self.device(n).driver.state(),
                                    **kwargs)
        return self.tracker

    # -- run state ------------------------------------------------------------------------
    def add_run_state_handler(self, handler: RunStateHandler) -> None:
        self._handlers.append(handler)

    def set_run_state(self, new: GuestState) -> None:
        """Change the run state and tell every handler (in registration order) before
        returning; a handler that raises does not stop the others, the first error is
        raised after all ran."""
        with self._state_lock:
            old = self.run_state
            if old is new:
                return
            self.run_state = new
            first: BaseException | None = None
            for h in list(self._handlers):
                try:
                    h(old, new)
                except Exception as e:  # noqa: BLE001 - every handler must hear it
                    first = first or e
        if first is not None:
            raise first

    def pause(self, state: GuestState = GuestState.PAUSED) -> None:
        if state is GuestState.RUNNING:
            raise ValueError("pause() to RUNNING: use resume()")
        self.set_run_state(state)

    def resume(self) -> None:
        self.set_run_state(GuestState.RUNNING)

    # -- teardown -------------------------------------------------------------------------
    def release_devices(self) -> None:
        """Close every device, group and container fd (in that order), every step even if
        one fails; the first failure is raised afterwards. RAM stays mapped."""
        first: KernelError | None = None
        for d in self.devices:
            try:
                d.driver.cleanup()      # data fds and v1 window mappings go first
            except KernelError as e:
                first = first or e
        for con in self.containers:
            try:
                con.container.close()
            except KernelError as e:
                first = first or e
        self.containers.clear()
        self.devices.clear()
        if first is not None:
            raise first

    def close(self) -> None:
        if self.closed:
            return
        first: BaseException | None = None
        try:
            self.release_devices()
        except KernelError as e:
            first = e
        for b in self.ram:
            try:
                b.close()
            except (KernelError, BufferError) as e:
                first = first or e
        self.ram.clear()
        self.closed = True
        if first is not None:
            raise first
