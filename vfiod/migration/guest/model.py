"""The guest a migration moves: its RAM, its DMA containers, its devices, its run state
(docs/architecture.md §1 steps 2-4; docs/kernel-contract.md §3.1 container/group/device, §3.7 MAP_DMA).

A ``Guest`` owns

* RAM regions (``RamBlock``, memory.py): each a shared file of ``size`` bytes at
  guest-physical address ``gpa``, mapped into this process for DMA;
* containers (type1v2): the groups attached to each, the IOVA -> guest mappings made on it
  (default: every RAM region at iova == gpa), and the devices opened through it;
* devices: the vfio ``Device``, the migration driver ``probe`` chose, the per-device
  ``pre_copy_dirty_page_tracking`` flag (QEMU's ``x-pre-copy-dirty-page-tracking``) and
  the device's ``id``, which a migration pairs it by (docs/architecture.md §1.5);
* the dirty tracker over all its containers (``make_tracker``, docs/architecture.md §3), which
  reads each device's migration state from its driver for the opt-out;
* the run state (``GuestState``) with handlers: pausing the guest calls every handler
  before ``pause`` returns, so whatever runs the guest (vCPUs, a simulated workload) has
  stopped writing by then.

``build_guest`` (builder.py) assembles one from a plain description. Everything goes
through ``KernelOps``: the same class serves the real host and the simulated one. fds
close device -> group -> container, then the RAM mappings and files.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence

from vfiod.dirty.providers.base import DmaSpace
from vfiod.dirty.tracker import DirtyTracker, TrackedContainer
from vfiod.errors import KernelError
from vfiod.kernel.ops import KernelOps
from vfiod.migration.guest.devices import (
    GuestContainer,
    GuestDevice,
    claim_running,
    device_identity,
    dma_logging_supported,
    group_members,
    join_group,
)
from vfiod.migration.guest.memory import RamBlock
from vfiod.migration.states import GuestState, MigState
from vfiod.migration.stream.header import DeviceInfo
from vfiod.migration.stream.ram import GuestRam
from vfiod.vfio import Container, DmaMapping, Group, HostPaths, RamRegion

#: (old, new) run state; called synchronously by ``Guest.set_run_state``.
RunStateHandler = Callable[[GuestState, GuestState], None]


class Guest:
    """See the module docstring. Build with ``build_guest`` (builder.py)."""

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
    def add_ram(self, region: RamRegion, path: str | None = None,
                handed: tuple[int, int] | None = None) -> RamBlock:
        """Add a RAM region backed by a new memfd (all zero), by the file at ``path``, or
        by a copy of the fd a VMM handed over (``handed``: fd, offset in it; the caller
        keeps the fd)."""
        ps = self.page_size
        if region.size <= 0 or region.gpa % ps or region.size % ps:
            raise ValueError(f"guest {self.name}: RAM region {region.name!r} gpa "
                             f"{region.gpa:#x} size {region.size:#x} must be positive "
                             f"multiples of {ps:#x}")
        for b in self.ram:
            if b.name == region.name:
                raise ValueError(f"guest {self.name}: RAM region {region.name!r} exists")
            if region.gpa < b.gpa + b.size and b.gpa < region.gpa + region.size:
                raise ValueError(f"guest {self.name}: RAM region {region.name!r} overlaps "
                                 f"{b.name!r}")
        if handed is not None:
            block = RamBlock.adopt(self.kernel, region, *handed)
        else:
            block = RamBlock.open(self.kernel, region,
                                  label=f"vfiod-{self.name}-{region.name}", path=path)
        self.ram.append(block)
        self.ram.sort(key=lambda b: b.gpa)
        return block

    def add_container(self, name: str, groups: Sequence[int], *,
                      devices: Sequence[str] | None = None,
                      maps: Sequence[tuple[int, int]] | None = None,
                      pre_copy_dirty_page_tracking: Mapping[str, bool] | None = None,
                      disable: Sequence[str] = (),
                      ids: Mapping[str, str] | None = None) -> GuestContainer:
        """Open a type1v2 container, attach ``groups``, open ``devices`` (default: every
        device sysfs lists in those groups), probe their migration drivers and map guest
        RAM for DMA: ``maps`` = (gpa, size) ranges inside RAM regions at iova == gpa
        (default: every region). ``ids``: device name -> the id a migration pairs it by
        (default: its name)."""
        if any(c.name == name for c in self.containers):
            raise ValueError(f"guest {self.name}: container {name!r} exists")
        c = Container.open(self.kernel, self.paths)
        gc = GuestContainer(name, c, disable=tuple(disable))
        self.containers.append(gc)
        opt = dict(pre_copy_dirty_page_tracking or {})
        for number in groups:
            grp = join_group(self.kernel, self.paths, c, number)
            members = group_members(self.kernel, self.paths, number)
            for dev_name in members if devices is None else [n for n in devices
                                                             if n in members]:
                self._open_device(gc, grp, dev_name, opt.pop(dev_name, True),
                                  (ids or {}).get(dev_name, dev_name))
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

    def _open_device(self, gc: GuestContainer, grp: Group, name: str,
                     pre_copy: bool, dev_id: str) -> GuestDevice:
        if any(d.name == name for d in self.devices):
            raise ValueError(f"guest {self.name}: device {name} is already open")
        twin = next((d for d in self.devices if d.id == dev_id), None)
        if twin is not None:
            raise ValueError(f"guest {self.name}: device id {dev_id!r} of {name} is already "
                             f"the id of {twin.name}: ids must be unique within a guest")
        dev = grp.get_device(name)
        identity = device_identity(self.kernel, self.paths, name)
        logging = dma_logging_supported(dev)
        driver = claim_running(name, dev)
        gd = GuestDevice(name, dev, driver, gc.name, pre_copy, identity, logging, dev_id)
        gc.devices.append(name)
        self.devices.append(gd)
        return gd

    def map_dma(self, gc: GuestContainer, gpa: int, size: int) -> DmaMapping:
        """MAP_DMA guest [gpa, gpa+size) at iova == gpa on ``gc``."""
        block = self.block_at(gpa)
        if gpa + size > block.gpa + block.size or size <= 0:
            raise ValueError(f"guest {self.name}: DMA map {gpa:#x}+{size:#x} is not inside "
                             f"RAM region {block.name}")
        m = gc.container.map_dma(gpa, block.addr + gpa - block.gpa, size, gpa=gpa)
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
        return tuple(b.region for b in self.ram)

    def guest_ram(self, writable: bool = False) -> GuestRam:
        """The stream's view of this RAM (a destination writes straight into it)."""
        return GuestRam(self.page_size, self.ram_regions(), [b.view() for b in self.ram],
                        writable=writable)

    def device_infos(self) -> tuple[DeviceInfo, ...]:
        return tuple(d.info() for d in self.devices)

    def device_states(self) -> dict[str, MigState]:
        return {d.name: d.driver.state() for d in self.devices}

    def dma_space(self, con: GuestContainer) -> DmaSpace:
        """Container ``con`` with its devices, as the dirty providers see it."""
        return DmaSpace(con.name, [self.device(n).device for n in con.devices],
                        type1=con.container)

    def make_tracker(self, clock: Callable[[], float] | None = None) -> DirtyTracker:
        """The guest's dirty tracker: every container with its devices' opt-out flags; the
        opt-out reads the devices' migration states from their drivers."""
        regions = [b.region for b in self.ram]
        tracked = []
        for con in self.containers:
            devs = [self.device(n) for n in con.devices]
            tracked.append(TrackedContainer(
                self.dma_space(con), list(con.mappings),
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
