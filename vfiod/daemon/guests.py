"""The guests the daemon owns: opened from the configuration at start, kept in the
``Registry`` (design.md §1 steps 2-4: containers, groups, device fds, guest RAM mapped for
DMA, migration and dirty-tracking probes).

A guest configured ``start = "running"`` runs here (it can be migrated away); one
configured ``start = "incoming"`` is opened the same way (zeroed RAM, devices ready to
load) and waits for a migration into it. After migrating away, the guest's fds and RAM are
released and it is re-opened fresh as "incoming" (it may come back); after a failed
incoming migration it is also re-opened fresh, because a destination must start from
zeroed memory (``session_digest``'s proof assumes it).

A guest that cannot be opened (a device not bound to VFIO, a group another process owns,
a device without migration support) is kept in state ``error`` with the reason, so
``vfiod ctl status`` and ``check`` can say why; the daemon still starts.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence

from vfiod.daemon.config import GuestConfig
from vfiod.daemon.config_sim import SimWorkload
from vfiod.daemon.registry import DeviceEntry, GuestEntry, Registry
from vfiod.dirty.providers.base import DmaSpace
from vfiod.dirty.providers.select import preferred
from vfiod.errors import KernelError, NotMigratable, VfiodError
from vfiod.kernel.ops import KernelOps
from vfiod.migration.guest import Guest, RamSpec
from vfiod.migration.states import GuestState, device_label
from vfiod.vfio import HostPaths
from vfiod.vfio.discovery import discover_device

log = logging.getLogger("vfiod.guests")

#: Starts a simulated guest's workload (sim backend only): (guest, config) -> stop function
WorkloadStarter = Callable[[Guest, SimWorkload], Callable[[], None] | None]


class GuestManager:
    def __init__(self, kernel: KernelOps, paths: HostPaths, registry: Registry, *,
                 workloads: Sequence[SimWorkload] = (),
                 start_workload: WorkloadStarter | None = None) -> None:
        self.kernel = kernel
        self.paths = paths
        self.registry = registry
        self.workloads = {w.guest: w for w in workloads}
        self._start_workload = start_workload
        self._stops: dict[str, Callable[[], None]] = {}
        self._fds: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        registry.refreshers.append(self.refresh)

    # -- opening ---------------------------------------------------------------------------
    def open_all(self, configs: Sequence[GuestConfig]) -> None:
        for gc in configs:
            entry = GuestEntry(gc)
            self.registry.add_guest(entry)
            self.open(entry, gc.start)

    def open(self, entry: GuestEntry, start: str) -> None:
        """Open ``entry``'s guest fresh; on failure the entry says why (state "error")."""
        gc = entry.config
        flags = {n: d.pre_copy_dirty_page_tracking for n, d in entry.devices.items()}
        entry.devices = {d.name: DeviceEntry(d.name, gc.name, d.container,
                                             pre_copy_dirty_page_tracking=flags.get(
                                                 d.name, d.pre_copy_dirty_page_tracking))
                         for d in gc.devices}
        try:
            guest = self._build(gc, entry)
        except (VfiodError, OSError, ValueError) as e:
            with self.registry.lock:
                entry.handle, entry.state, entry.error = None, "error", str(e)
            log.error("guest %s: cannot open: %s", gc.name, e)
            return
        with self.registry.lock:
            entry.handle, entry.error = guest, None
            entry.state = "running" if start == "running" else "incoming"
            self._describe(entry, guest)
        if start == "incoming":
            guest.set_run_state(GuestState.INMIGRATE)
        else:
            self.started_running(entry)
        log.info("guest %s: open (%s), %d device(s), %d bytes of RAM", gc.name, entry.state,
                 len(guest.devices), guest.ram_bytes)

    def started_running(self, entry: GuestEntry) -> None:
        """The guest runs here now (configured so, or an incoming migration completed)."""
        load = self.workloads.get(entry.name)
        if load is None or self._start_workload is None or entry.name in self._stops:
            return
        try:
            stop = self._start_workload(entry.handle, load)
        except (ValueError, VfiodError) as e:
            log.error("guest %s: simulated workload not started: %s", entry.name, e)
            return
        if stop is not None:
            self._stops[entry.name] = stop

    def _build(self, gc: GuestConfig, entry: GuestEntry) -> Guest:
        guest = Guest(self.kernel, gc.name, gc.page_size, self.paths)
        fds: list[int] = []
        self._fds[gc.name] = fds
        try:
            for r in gc.ram:
                spec = RamSpec(r.name, r.gpa, r.size)
                if r.path is None:
                    guest.add_ram(spec)
                else:
                    fd = self.kernel.open(r.path, os.O_RDWR)
                    fds.append(fd)
                    guest.add_ram(spec, fd)
            containers: dict[str, list[str]] = {}
            for d in gc.devices:
                containers.setdefault(d.container, []).append(d.name)
            for cname, names in containers.items():
                groups = sorted({self._group_of(n, entry) for n in names})
                maps = [(r.gpa, r.size) for r in gc.regions_of(cname)]
                guest.add_container(cname, groups, devices=names, maps=maps,
                                    pre_copy_dirty_page_tracking={
                                        n: entry.devices[n].pre_copy_dirty_page_tracking
                                        for n in names})
        except NotMigratable as e:
            entry.devices[e.device].reason = e.reason
            self._close_guest(gc.name, guest)
            raise
        except BaseException:
            self._close_guest(gc.name, guest)
            raise
        return guest

    def _group_of(self, name: str, entry: GuestEntry) -> int:
        found = discover_device(self.kernel, name, self.paths)
        if not found.vfio_capable or found.group is None:
            entry.devices[name].reason = found.reason
            raise KernelError(errno.ENODEV, "open", name, f"not usable: {found.reason}")
        return found.group

    def _describe(self, entry: GuestEntry, guest: Guest) -> None:
        trackers: dict[str, str] = {}
        for gc in guest.containers:
            devs = [guest.device(n).device for n in gc.devices]
            try:
                trackers[gc.name] = preferred(DmaSpace(gc.name, devs, type1=gc.container),
                                              gc.disable)
            except (VfiodError, ValueError) as e:
                log.warning("guest %s: container %s: tracker probe failed: %s", entry.name,
                            gc.name, e)
        for gd in guest.devices:
            d = entry.devices[gd.name]
            info = gd.info()
            d.protocol, d.capabilities = info.protocol, list(info.capabilities)
            d.tracker = trackers.get(gd.container)
            d.dma_logging, d.migratable = gd.dma_logging, True
            d.reason = f"migration {info.protocol} ({', '.join(info.capabilities)})"
        self._refresh_entry(entry)

    # -- runtime ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """Device states from the drivers (cached values: no syscall); registry lock held."""
        for entry in self.registry.guests.values():
            self._refresh_entry(entry)

    def _refresh_entry(self, entry: GuestEntry) -> None:
        guest: Guest | None = entry.handle
        live = {d.name: d for d in guest.devices} if guest is not None else {}
        for name, d in entry.devices.items():
            gd = live.get(name)
            if gd is None:
                d.state, d.state_label = None, "-"
            else:
                st = gd.driver.state()
                d.state, d.state_label = int(st), device_label(st)
                d.pre_copy_dirty_page_tracking = gd.pre_copy_dirty_page_tracking

    def set_tracking(self, entry: GuestEntry, device: str, enabled: bool) -> None:
        """The per-device opt-out; the caller made sure no migration runs."""
        with self.registry.lock:
            entry.devices[device].pre_copy_dirty_page_tracking = enabled
            guest: Guest | None = entry.handle
            if guest is not None and any(d.name == device for d in guest.devices):
                guest.device(device).pre_copy_dirty_page_tracking = enabled

    def reopen(self, entry: GuestEntry, start: str) -> None:
        """Release everything of the guest and open it fresh (``start``: its new role)."""
        self.close(entry)
        self.open(entry, start)

    # -- closing ---------------------------------------------------------------------------
    def close(self, entry: GuestEntry) -> None:
        stop = self._stops.pop(entry.name, None)
        if stop is not None:
            try:
                stop()
            except (TimeoutError, VfiodError) as e:
                log.error("guest %s: workload did not stop: %s", entry.name, e)
        with self.registry.lock:
            guest, entry.handle = entry.handle, None
            entry.state = "stopped"
        if guest is not None:
            # What the devices were left in, for the journal: after a shutdown that
            # cancelled a migration, a source's devices must say RUNNING here.
            states = ", ".join(f"{d.name} {device_label(d.driver.state())}"
                               for d in guest.devices)
            log.info("guest %s: closing (%s); devices: %s", entry.name,
                     guest.run_state.name, states or "none open")
            self._close_guest(entry.name, guest)

    def _close_guest(self, name: str, guest: Guest) -> None:
        try:
            guest.close()           # device -> group -> container, then RAM
        except (KernelError, BufferError) as e:
            log.error("guest %s: closing: %s", name, e)
        for fd in self._fds.pop(name, []):
            try:
                self.kernel.close(fd)
            except KernelError as e:
                log.error("guest %s: closing RAM file: %s", name, e)

    def close_all(self) -> None:
        for entry in list(self.registry.guests.values()):
            self.close(entry)
