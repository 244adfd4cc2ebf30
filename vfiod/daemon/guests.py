"""The guests the daemon owns: opened from the configuration at start, kept in the
``Registry`` (docs/architecture.md §1 steps 2-4: containers, groups, device fds, guest RAM mapped for
DMA, migration and dirty-tracking probes). ``config_plan`` (``guest_plan.py``) turns a
configured guest into the plain description ``build_guest`` assembles (the same builder
the demo and the tests use); ``guest_migratability`` describes its devices for status and
``check``.

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

Threads: the open guests (``_guests``, whose fds the migration threads use) change under
the registry lock; the workloads' stop functions (``_stops``), the guests a thread is
re-opening or starting (``_busy``) and the stop flag under this manager's own lock, taken
on its own or after the registry lock. ``close_all`` (the stop, docs/architecture.md §6)
closes no guest a thread still uses: one a running migration holds (the caller's
``held``) or one in ``_busy``. Its fds are left open for the process exit, which closes
them and resets its devices; the log says which guest and why. After the stop began no
guest is re-opened or started again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from vfiod.daemon.config import GuestConfig
from vfiod.daemon.config_sim import SimWorkload
from vfiod.daemon.guest_plan import RamInUse, config_plan
from vfiod.daemon.lifecycle import LifecycleError, LifecycleState
from vfiod.daemon.registry import DeviceEntry, GuestEntry, Registry
from vfiod.daemon.runstate.handler import VmmRunStateHandler, backend_for
from vfiod.errors import KernelError, NotMigratable, VfiodError
from vfiod.kernel.ops import KernelOps
from vfiod.migration.guest import Guest, HandedVfio, UnusableDevice, build_guest
from vfiod.migration.guest.migratability import guest_migratability
from vfiod.migration.states import GuestState, device_label
from vfiod.vfio import HostPaths

log = logging.getLogger("vfiod.guests")
_STOPPING = "the daemon is stopping"


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
        self._guests: dict[str, Guest] = {}          # under the registry lock
        self._stops: dict[str, Callable[[], None]] = {}
        self._busy: set[str] = set()                 # re-opened or started on a thread
        self._stopping = False
        self._lock = threading.Lock()                # the three above
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
        """Open ``entry``'s guest fresh; on failure the entry says why (state "failed").
        A guest whose RAM comes from its VMM stays ``defined``: ``attach`` opens it."""
        gc = entry.config
        if gc.vmm_ram:
            log.info("guest %s: waits for its VMM to attach its RAM (%s)", gc.name,
                     ", ".join(r.name for r in gc.vmm_ram))
            return
        self._fresh_device_entries(entry)
        try:
            guest = self._build(gc, entry)
        except (VfiodError, OSError, ValueError) as e:
            self.registry.lifecycle.move(gc.name, LifecycleState.FAILED, str(e))
            log.error("guest %s: cannot open: %s", gc.name, e)
            return
        self._install(entry, guest, start)

    def attach(self, entry: GuestEntry, handed: Mapping[str, tuple[int, int]],
               vfio: Mapping[str, HandedVfio] | None = None) -> None:
        """Open a ``from = "vmm"`` guest on the checked RAM (and VFIO) fds its VMM handed
        over (the caller keeps them; the guest works on copies), in its configured role. A
        failure is raised, leaving it ``defined`` with nothing held (§8.1)."""
        gc = entry.config
        with self._lock:
            if self._stopping:
                raise VfiodError(f"guest {gc.name}: not attached: the daemon is stopping")
            if entry.name in self._busy:
                raise VfiodError(f"guest {gc.name}: not attached: another attach or a "
                                 "re-open of it is under way")
            self._busy.add(entry.name)
        try:
            with self.registry.lock:
                if entry.state is not LifecycleState.DEFINED or gc.name in self._guests:
                    raise VfiodError(f"guest {gc.name}: not attached: it is {entry.state} "
                                     "(detach it first)")
            self._fresh_device_entries(entry)
            guest = self._build(gc, entry, handed, vfio)
            if not self._install(entry, guest, gc.start):
                raise VfiodError(f"guest {gc.name}: not attached: the daemon is stopping")
        finally:
            with self._lock:
                self._busy.discard(entry.name)

    def _fresh_device_entries(self, entry: GuestEntry) -> None:
        gc = entry.config
        with self.registry.lock:                     # status reads them
            flags = {n: d.pre_copy_dirty_page_tracking for n, d in entry.devices.items()}
            entry.devices = {d.name: DeviceEntry(d.name, gc.name, d.container,
                                                 pre_copy_dirty_page_tracking=flags.get(
                                                     d.name, d.pre_copy_dirty_page_tracking))
                             for d in gc.devices}

    def _install(self, entry: GuestEntry, guest: Guest, start: str) -> bool:
        """Keep the built ``guest`` and give it its role ``start``; False (and the guest
        closed) if the stop began meanwhile."""
        gc = entry.config
        lifecycle = self.registry.lifecycle
        with self.registry.lock:
            with self._lock:
                stopping = self._stopping
            if not stopping:
                self._guests[gc.name] = guest
        if stopping:
            # The stop began while this thread built it: nobody else has seen it.
            log.info("guest %s: not re-opened: the daemon is stopping", gc.name)
            self._close_guest(gc.name, guest)
            return False
        with self.registry.lock:
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
            self._start_load(entry)
        if gc.runstate is not None:
            # after the initial state: the VMM starts in its own state; from here on
            # a migration's pause and resume reach it (docs/architecture.md §8.2)
            guest.add_run_state_handler(VmmRunStateHandler(
                gc.name, backend_for(gc.runstate), gc.runstate_timeout_s))
        log.info("guest %s: open (%s), %d device(s), %d bytes of RAM", gc.name, entry.state,
                 len(guest.devices), guest.ram_bytes)
        return True

    def started_running(self, entry: GuestEntry) -> None:
        """The guest runs here now: an incoming migration completed (its thread calls)."""
        with self._working(entry.name) as allowed:
            if allowed:
                self._start_load(entry)

    def _start_load(self, entry: GuestEntry) -> None:
        """Start the guest's simulated workload, if it has one and none runs."""
        load = self.workloads.get(entry.name)
        if load is None or self._start_workload is None:
            return
        with self.registry.lock:
            guest = self._guests.get(entry.name)
        with self._lock:
            if guest is None or entry.name in self._stops:
                return
        try:
            stop = self._start_workload(guest, load)
        except (ValueError, VfiodError) as e:
            log.error("guest %s: simulated workload not started: %s", entry.name, e)
            return
        if stop is not None:
            with self._lock:
                self._stops[entry.name] = stop

    @contextmanager
    def _working(self, name: str) -> Iterator[bool]:
        """This thread works on guest ``name``'s fds: the stop leaves them alone until it
        is done. Yields False (and marks nothing) once the stop began."""
        with self._lock:
            allowed = not self._stopping
            if allowed:
                self._busy.add(name)
        try:
            yield allowed
        finally:
            if allowed:
                with self._lock:
                    self._busy.discard(name)

    def _build(self, gc: GuestConfig, entry: GuestEntry,
               handed: Mapping[str, tuple[int, int]] | None = None,
               vfio: Mapping[str, HandedVfio] | None = None) -> Guest:
        tracking = {n: d.pre_copy_dirty_page_tracking for n, d in entry.devices.items()}
        try:
            return build_guest(self.kernel, config_plan(gc, tracking, handed, vfio),
                               self.paths)
        except (NotMigratable, UnusableDevice) as e:
            with self.registry.lock:
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

    def ram_files_in_use(self) -> list[RamInUse]:
        """Which file bytes the open guests' RAM maps (for ``attach``'s check that a VMM
        hands over no RAM another guest already uses, docs/architecture.md §8.1)."""
        with self.registry.lock:
            blocks = [(name, b) for name, g in self._guests.items() for b in g.ram]
            out = []
            for name, b in blocks:
                try:
                    f = self.kernel.describe_fd(b.fd)
                except KernelError:
                    continue             # closed meanwhile: it uses nothing any more
                out.append(RamInUse(name, b.name, f.device, f.inode, b.offset, b.size))
            return out

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

    def reopen(self, entry: GuestEntry, start: str,
               release: Callable[[], object] | None = None) -> None:
        """``close`` the guest (``release``: see there), then open it fresh as ``start``
        (its new role); a migration's thread calls it. Once the stop began it is closed
        only: the stop does not wait for it to open again."""
        with self._working(entry.name) as allowed:
            self.close(entry, "re-opened fresh", release)
            if allowed:
                self.open(entry, start)
            else:
                log.info("guest %s: not re-opened: the daemon is stopping", entry.name)

    # -- closing ---------------------------------------------------------------------------
    def close(self, entry: GuestEntry, cause: str,
              release: Callable[[], object] | None = None) -> None:
        """Close what the guest holds, then record it ``defined`` (nothing held: its VMM may
        take its RAM back at once): ``release``, a migration's last lifecycle steps ending
        in ``defined``, else the plain release. A release the lifecycle refuses closes
        nothing; ``release`` still runs then (its record ends) and raises."""
        with self.registry.lock:
            try:
                self.registry.lifecycle.check_release(entry.name, cause)
            except LifecycleError:
                if release is None:
                    raise
                release()          # ends the migration's record; its refused step raises
                raise
            guest = self._guests.pop(entry.name, None)
        self._release(entry.name, guest)
        if release is not None:
            release()
        else:
            self.registry.lifecycle.release(entry.name, cause)

    def _release(self, name: str, guest: Guest | None) -> None:
        """Stop the guest's workload, then close its fds and RAM (no longer listed)."""
        with self._lock:
            stop = self._stops.pop(name, None)
        if stop is not None:
            try:
                stop()
            except (TimeoutError, VfiodError) as e:
                log.error("guest %s: workload did not stop: %s", name, e)
        if guest is not None:
            # What the devices were left in, for the journal: after a shutdown that
            # cancelled a migration, a source's devices must say RUNNING here.
            states = ", ".join(f"{d.name} {device_label(d.driver.state())}"
                               for d in guest.devices)
            log.info("guest %s: closing (%s); devices: %s", name,
                     guest.run_state.name, states or "none open")
            self._close_guest(name, guest)

    def _close_guest(self, name: str, guest: Guest) -> None:
        try:
            guest.close()           # device -> group -> container, then RAM
        except (KernelError, BufferError) as e:
            log.error("guest %s: closing: %s", name, e)

    def close_all(self, held: Callable[[str], bool] | None = None) -> list[str]:
        """The stop: close every guest but those a thread still uses (``held``: a running
        migration holds it; or a thread here re-opens or starts it) and those whose
        lifecycle refuses a release. Returns the guests left open, for the process exit
        to close."""
        with self._lock:
            self._stopping = True
            busy = set(self._busy)
        kept: list[str] = []
        for entry in list(self.registry.guests.values()):
            why: str | None = None
            guest: Guest | None = None
            with self.registry.lock:
                if held is not None and held(entry.name):
                    why = "its migration still runs (past the stop budget)"
                elif entry.name in busy:
                    why = "a migration thread still re-opens or starts it"
                else:
                    try:
                        self.registry.lifecycle.check_release(entry.name, _STOPPING)
                    except LifecycleError as e:
                        why = f"it is {entry.state}, which may not be released: {e}"
                    else:
                        guest = self._guests.pop(entry.name, None)
            if why is None:
                self._release(entry.name, guest)
                self.registry.lifecycle.release(entry.name, _STOPPING)
                continue
            kept.append(entry.name)
            log.error("guest %s: fds left open: %s; they close, and the kernel resets its "
                      "devices, when the process exits", entry.name, why)
        return kept
