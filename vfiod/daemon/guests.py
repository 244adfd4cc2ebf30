"""The guests the daemon owns: opened from the configuration at start, kept in the
``Registry`` (docs/architecture.md §1 steps 2-4: containers, groups, device fds, guest RAM mapped for
DMA, migration and dirty-tracking probes). ``config_plan`` turns a configured guest into
the plain description ``build_guest`` assembles (the same builder the demo and the tests
use); ``guest_migratability`` describes its devices for status and ``check``.

A guest configured ``start = "running"`` runs here (it can be migrated away); one
configured ``start = "incoming"`` is opened the same way (zeroed RAM, devices ready to
load) and waits for a migration into it. After migrating away, the guest's fds and RAM are
released and it is re-opened fresh as "incoming" (it may come back); after a failed
incoming migration it is also re-opened fresh, because a destination must start from
zeroed memory (the digests' proof, session/digest.py, assumes it).

Every state change goes through the ``GuestLifecycle`` (``lifecycle.py``): opened →
``claimed`` → ``running`` or ``incoming``; closed → ``defined``. The open ``Guest``
objects (fds, RAM) are kept here, not in the registry.

A guest that cannot be opened (a device not bound to VFIO, a group another process owns,
a device without migration support) is kept in state ``failed`` with the reason, so
``vfiod ctl status`` and ``check`` can say why; the daemon still starts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence

from vfiod.daemon.config import GuestConfig
from vfiod.daemon.config_sim import SimWorkload
from vfiod.daemon.lifecycle import LifecycleState
from vfiod.daemon.registry import DeviceEntry, GuestEntry, Registry
from vfiod.errors import KernelError, NotMigratable, VfiodError
from vfiod.kernel.ops import KernelOps
from vfiod.migration.guest import (
    ContainerPlan,
    DevicePlan,
    Guest,
    GuestPlan,
    UnusableDevice,
    build_guest,
)
from vfiod.migration.guest.migratability import guest_migratability
from vfiod.migration.states import GuestState, device_label
from vfiod.vfio import HostPaths, RamRegion

log = logging.getLogger("vfiod.guests")

#: Starts a simulated guest's workload (sim backend only): (guest, config) -> stop function
WorkloadStarter = Callable[[Guest, SimWorkload], Callable[[], None] | None]


def config_plan(gc: GuestConfig, tracking: Mapping[str, bool]) -> GuestPlan:
    """The builder's description of configured guest ``gc``; ``tracking``: the devices'
    current pre-copy dirty-tracking opt-outs (they survive a re-open)."""
    containers = dict.fromkeys(d.container for d in gc.devices)
    return GuestPlan(
        gc.name, tuple(RamRegion(r.name, r.gpa, r.size) for r in gc.ram),
        tuple(DevicePlan(d.name, d.container,
                         tracking.get(d.name, d.pre_copy_dirty_page_tracking), d.id)
              for d in gc.devices),
        tuple(ContainerPlan(c, tuple((r.gpa, r.size) for r in gc.regions_of(c)))
              for c in containers),
        gc.page_size, {r.name: r.path for r in gc.ram if r.path is not None})


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
        self._guests: dict[str, Guest] = {}
        self._lock = threading.Lock()
        registry.refreshers.append(self.refresh)

    # -- opening ---------------------------------------------------------------------------
    def open_all(self, configs: Sequence[GuestConfig],
                 starts: Mapping[str, str] | None = None) -> None:
        """Open every configured guest as ``starts`` says (a restart's recovery plan, by
        guest), else as its configuration says."""
        for gc in configs:
            entry = self.registry.add_guest(gc)
            self.open(entry, (starts or {}).get(gc.name, gc.start))

    def open(self, entry: GuestEntry, start: str) -> None:
        """Open ``entry``'s guest fresh; on failure the entry says why (state "failed")."""
        gc = entry.config
        flags = {n: d.pre_copy_dirty_page_tracking for n, d in entry.devices.items()}
        entry.devices = {d.name: DeviceEntry(d.name, gc.name, d.container,
                                             pre_copy_dirty_page_tracking=flags.get(
                                                 d.name, d.pre_copy_dirty_page_tracking))
                         for d in gc.devices}
        try:
            guest = self._build(gc, entry)
        except (VfiodError, OSError, ValueError) as e:
            self.registry.lifecycle.move(gc.name, LifecycleState.FAILED, str(e))
            log.error("guest %s: cannot open: %s", gc.name, e)
            return
        lifecycle = self.registry.lifecycle
        with self.registry.lock:
            self._guests[gc.name] = guest
            lifecycle.move(gc.name, LifecycleState.CLAIMED, "devices and RAM opened")
            if start == "running":
                lifecycle.move(gc.name, LifecycleState.RUNNING, "runs here")
            elif start == "outcome-unknown":
                lifecycle.move(gc.name, LifecycleState.OUTCOME_UNKNOWN,
                               "restarted after a commit with no outcome: paused until the "
                               "peer answers")
            else:
                lifecycle.move(gc.name, LifecycleState.INCOMING, "waits for a migration into it")
            self._describe(entry, guest)
        if start == "incoming":
            guest.set_run_state(GuestState.INMIGRATE)
        elif start == "outcome-unknown":
            guest.set_run_state(GuestState.PAUSED)
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
            stop = self._start_workload(self._guests[entry.name], load)
        except (ValueError, VfiodError) as e:
            log.error("guest %s: simulated workload not started: %s", entry.name, e)
            return
        if stop is not None:
            self._stops[entry.name] = stop

    def _build(self, gc: GuestConfig, entry: GuestEntry) -> Guest:
        tracking = {n: d.pre_copy_dirty_page_tracking for n, d in entry.devices.items()}
        try:
            return build_guest(self.kernel, config_plan(gc, tracking), self.paths)
        except (NotMigratable, UnusableDevice) as e:
            entry.devices[e.device].reason = e.reason
            raise

    def _describe(self, entry: GuestEntry, guest: Guest) -> None:
        for name, m in guest_migratability(guest).items():
            if m.tracker_error:
                log.warning("guest %s: device %s: tracker probe failed: %s", entry.name,
                            name, m.tracker_error)
            d = entry.devices[name]
            d.protocol, d.capabilities = m.protocol, list(m.capabilities)
            d.tracker = m.tracker
            d.dma_logging, d.migratable = m.dma_logging, True
            d.reason = m.summary
        self._refresh_entry(entry)

    # -- runtime ---------------------------------------------------------------------------
    def opened(self, name: str) -> Guest | None:
        """The guest's open ``Guest`` (fds, RAM); None while it is not open."""
        with self.registry.lock:
            return self._guests.get(name)

    def refresh(self) -> None:
        """Device states from the drivers (cached values: no syscall); registry lock held."""
        for entry in self.registry.guests.values():
            self._refresh_entry(entry)

    def _refresh_entry(self, entry: GuestEntry) -> None:
        guest = self._guests.get(entry.name)
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
            guest = self._guests.get(entry.name)
            if guest is not None and any(d.name == device for d in guest.devices):
                guest.device(device).pre_copy_dirty_page_tracking = enabled

    def reopen(self, entry: GuestEntry, start: str) -> None:
        """Release everything of the guest and open it fresh (``start``: its new role)."""
        self.close(entry, "re-opened fresh")
        self.open(entry, start)

    # -- closing ---------------------------------------------------------------------------
    def close(self, entry: GuestEntry, cause: str) -> None:
        stop = self._stops.pop(entry.name, None)
        if stop is not None:
            try:
                stop()
            except (TimeoutError, VfiodError) as e:
                log.error("guest %s: workload did not stop: %s", entry.name, e)
        with self.registry.lock:
            guest = self._guests.pop(entry.name, None)
            self.registry.lifecycle.release(entry.name, cause)
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

    def close_all(self) -> None:
        for entry in list(self.registry.guests.values()):
            self.close(entry, "the daemon is stopping")
