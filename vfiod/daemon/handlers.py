"""The control operations: what the daemon does for each validated request
(docs/architecture.md §6; the operations and their arguments are defined in ``vfiod.api.ops``).

Every failure is an ``ApiError`` with a code the client can branch on: ``not_found`` (no
such guest or device), ``busy`` (a migration of that guest runs), ``failed`` (the
operation ran and the kernel or the guest's state said no, with the reason).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vfiod import __version__
from vfiod.api.ops import (
    Args,
    AttachArgs,
    CancelArgs,
    CheckArgs,
    DetachArgs,
    DirtyTrackingArgs,
    MigrateArgs,
    ResolveArgs,
    StatusArgs,
)
from vfiod.api.schema import SCHEMA_VERSION, ApiError, ApiErrorCode, EncodedResult
from vfiod.daemon import check
from vfiod.daemon.attach import check_hand_over, refusal
from vfiod.daemon.attach_vfio import check_vfio_hand_over, groups_held
from vfiod.daemon.guests import GuestManager
from vfiod.daemon.journal import JournalError
from vfiod.daemon.lifecycle import LifecycleState
from vfiod.daemon.migrations import MigrationService
from vfiod.daemon.observe import ObservedDevices
from vfiod.daemon.registry import GuestEntry, Registry
from vfiod.daemon.status_builds import StatusBuilds
from vfiod.daemon.status_pieces import StatusPieces
from vfiod.errors import KernelError, VfiodError
from vfiod.kernel.ops import KernelOps
from vfiod.migration.planning.hostfacts import HostFacts
from vfiod.vfio import HostPaths
from vfiod.vfio.discovery import discover


@dataclass
class DaemonInfo:
    """Static facts about this daemon, shown by ``hello`` and ``status``."""

    backend: str
    config: str
    control_socket: str
    metrics: str | None = None
    migration_listen: str | None = None
    started: float = field(default_factory=time.time)
    pid: int = field(default_factory=os.getpid)
    restart_needed: list[str] = field(default_factory=list)
    reload_error: str | None = None
    #: why the switchover histories were not restored at start (None: they were, or
    #: there were none yet)
    history_warning: str | None = None


#: States a VMM may take its RAM back from (no migration decides about it then).
_DETACHABLE = (LifecycleState.CLAIMED, LifecycleState.RUNNING, LifecycleState.INCOMING,
               LifecycleState.MIGRATED_AWAY, LifecycleState.FAILED)


class Handlers:
    def __init__(self, registry: Registry, guests: GuestManager, migrations: MigrationService,
                 kernel: KernelOps, paths: HostPaths, facts: Callable[[], HostFacts],
                 info: DaemonInfo, observed: ObservedDevices | None = None) -> None:
        self.registry = registry
        self.guests = guests
        self.migrations = migrations
        self.kernel = kernel
        self.paths = paths
        self.facts = facts
        self.info = info
        self.observed = observed
        self.status_pieces = StatusPieces()
        self.status_builds = StatusBuilds(lambda copied: self._build_status(None, copied))

    def __call__(self, op: str, args: Args) -> dict[str, Any]:
        if op == "hello":
            return self.hello()
        if op == "status":
            assert isinstance(args, StatusArgs)
            return self.status(args)
        if op == "devices":
            return self.devices()
        if op == "check":
            assert isinstance(args, CheckArgs)
            return self.check(args)
        if op == "migrate":
            assert isinstance(args, MigrateArgs)
            return self.migrate(args)
        if op == "cancel":
            assert isinstance(args, CancelArgs)
            return self.cancel(args)
        if op == "resolve":
            assert isinstance(args, ResolveArgs)
            return self.resolve(args)
        if op == "dirty_tracking":
            assert isinstance(args, DirtyTrackingArgs)
            return self.dirty_tracking(args)
        if op == "attach":
            assert isinstance(args, AttachArgs)
            return self.attach(args)
        if op == "detach":
            assert isinstance(args, DetachArgs)
            return self.detach(args)
        raise ApiError(ApiErrorCode.UNKNOWN_OP, f"operation {op!r} has no handler")

    # -- lookups ---------------------------------------------------------------------------
    def _guest(self, name: str) -> GuestEntry:
        entry = self.registry.guest(name)
        if entry is None:
            known = ", ".join(sorted(self.registry.guests)) or "none configured"
            raise ApiError(ApiErrorCode.NOT_FOUND, f"no guest {name!r} (guests: {known})")
        return entry

    def _owner(self, device: str) -> GuestEntry | None:
        with self.registry.lock:
            return next((g for g in self.registry.guests.values() if device in g.devices),
                        None)

    # -- operations ------------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        return {"version": __version__, "schema": SCHEMA_VERSION,
                "backend": self.info.backend, "pid": self.info.pid}

    def status(self, args: StatusArgs) -> dict[str, Any]:
        """Every guest's answer is shared by the requests that arrive while it is built
        (``status_builds.py``); one guest's is built for its request alone (a quarter of
        the work)."""
        if args.guest is None:
            return self.status_builds.get()
        self._guest(args.guest)
        return self._build_status(args.guest, lambda: None)

    def _build_status(self, only: str | None, copied: Callable[[], None]) -> EncodedResult:
        """The answer, spliced from the pieces of it that did not change since the last
        request (``status_pieces.py``)."""
        live = self.migrations.ledger.live_status()
        with self.registry.lock:
            guests, finished = self.registry.status_rows(only)
            copied()
        for g in guests:
            if g["migration"] is not None and g["name"] in live:
                g["migration"]["live"] = live[g["name"]]
        i = self.info
        daemon = {"version": __version__, "schema": SCHEMA_VERSION,
                  "backend": i.backend, "pid": i.pid, "config": i.config,
                  "uptime_s": time.time() - i.started,
                  "control_socket": i.control_socket, "metrics": i.metrics,
                  "migration_listen": i.migration_listen,
                  "restart_needed": list(i.restart_needed),
                  "reload_error": i.reload_error, "history_warning": i.history_warning}
        # another VMM's devices (docs/architecture.md §8.5), in the whole host's status
        # only; read outside the registry lock
        observed = self.observed.rows() if self.observed and only is None else []
        return self.status_pieces.answer(daemon, guests, finished, observed, only)

    def devices(self) -> dict[str, Any]:
        try:
            found = discover(self.kernel, self.paths)
        except KernelError as e:
            raise ApiError(ApiErrorCode.FAILED, f"device discovery failed: {e}") from None
        out = []
        with self.registry.lock:
            for d in found:
                owner = self._owner(d.name)
                entry = owner.devices[d.name] if owner is not None else None
                out.append({
                    "name": d.name, "kind": d.kind, "group": d.group, "driver": d.driver,
                    "vendor": f"{d.vendor:#06x}" if d.vendor is not None else None,
                    "device": f"{d.device:#06x}" if d.device is not None else None,
                    "vfio_capable": d.vfio_capable, "reason": d.reason,
                    "guest": owner.name if owner is not None else None,
                    "protocol": entry.protocol if entry else None,
                    "state": entry.state_label if entry else None,
                    "tracker": entry.tracker if entry else None,
                    "pre_copy_dirty_page_tracking":
                        entry.pre_copy_dirty_page_tracking if entry else None,
                    **check.device_migratability(self.kernel, self.paths, d.name, entry),
                })
        return {"devices": out}

    def check(self, args: CheckArgs) -> dict[str, Any]:
        entry = self.registry.guest(args.target)
        if entry is not None:
            facts = self.facts()    # reads /proc and /sys: not under the registry lock
            with self.registry.lock:
                for refresh in self.registry.refreshers:
                    refresh()
                return check.check_guest(entry, facts,
                                         defaults=self.migrations.defaults,
                                         guest=self.guests.opened(entry.name))
        owner = self._owner(args.target)
        if owner is not None:
            with self.registry.lock:
                return check.check_owned_device(owner.devices[args.target], owner)
        try:
            return check.probe_unowned(self.kernel, self.paths, args.target)
        except KernelError as e:
            if e.errno == errno.ENODEV:
                raise ApiError(ApiErrorCode.NOT_FOUND, f"no guest or device {args.target!r} "
                               f"on this host ({e})") from None
            raise ApiError(ApiErrorCode.FAILED, f"check {args.target}: {e}") from None

    def migrate(self, args: MigrateArgs) -> dict[str, Any]:
        entry = self._guest(args.guest)
        # Checked and started in one hold of the lock: no other request gets in between.
        with self.registry.lock:
            if entry.migration is not None and entry.migration.active:
                raise ApiError(ApiErrorCode.BUSY, f"guest {entry.name} is already migrating "
                               f"({entry.migration.role}, {entry.migration.peer})")
            if entry.state is not LifecycleState.RUNNING:
                why = (entry.error if entry.state is LifecycleState.FAILED
                       else f"it is {entry.state} here")
                raise ApiError(ApiErrorCode.FAILED, f"guest {entry.name} cannot be migrated "
                               f"from this host: {why}")
            bad = [d for d in entry.devices.values() if not d.migratable]
            if bad:
                raise ApiError(ApiErrorCode.FAILED, f"guest {entry.name} cannot be migrated: "
                               + "; ".join(f"{d.name}: {d.reason}" for d in bad))
            try:
                rec = self.migrations.start_outgoing(
                    entry, args.host, args.port, downtime_limit_ms=args.downtime_limit_ms,
                    timeout_s=args.timeout_s, on_timeout=args.on_timeout,
                    channels=args.channels)
            except JournalError as e:       # nothing started: it could not be written down
                raise ApiError(ApiErrorCode.FAILED, f"guest {entry.name} was not migrated: "
                               f"{e}") from None
            return {"migration": rec.to_json()}

    def cancel(self, args: CancelArgs) -> dict[str, Any]:
        entry = self._guest(args.guest)
        rec = self.migrations.ledger.cancel(entry)
        if rec is None:
            raise ApiError(ApiErrorCode.NOT_FOUND, f"guest {entry.name} has no migration "
                           "running")
        return {"migration": rec.id, "guest": entry.name, "cancel_requested": True}

    def resolve(self, args: ResolveArgs) -> dict[str, Any]:
        """Settle an unsettled migration by hand; the peer is asked once more first, and
        its answer wins (docs/architecture.md §1.7)."""
        entry = self._guest(args.guest)
        try:
            what = self.migrations.resolution.resolve_by_hand(entry.name, args.resume_here)
        except ValueError as e:
            raise ApiError(ApiErrorCode.FAILED, str(e)) from None
        return {"guest": entry.name, "result": what, "state": entry.state.value}

    def dirty_tracking(self, args: DirtyTrackingArgs) -> dict[str, Any]:
        owner = self._owner(args.device)
        if owner is None:
            raise ApiError(ApiErrorCode.NOT_FOUND, f"device {args.device} belongs to no guest "
                           "of this daemon")
        with self.registry.lock:
            if owner.migration is not None and owner.migration.active:
                raise ApiError(ApiErrorCode.BUSY, f"guest {owner.name} is migrating: the "
                               "opt-out is read when a migration starts; change it before "
                               "or after")
            self.guests.set_tracking(owner, args.device, args.enabled)
        return {"device": args.device, "guest": owner.name,
                "pre_copy_dirty_page_tracking": args.enabled}

    def attach(self, args: AttachArgs) -> dict[str, Any]:
        """A VMM hands a ``from = "vmm"`` guest's RAM, and the VFIO fds of its
        ``from = "vmm"`` devices, over (docs/architecture.md §8.1): every fd checked
        first; the guest works on its own copies of the fds."""
        entry = self._guest(args.guest)
        with self.registry.lock:
            if entry.state is not LifecycleState.DEFINED:
                raise ApiError(ApiErrorCode.BUSY, f"attach {entry.name}: it is "
                               f"{entry.state}, already attached (detach first); nothing "
                               "was attached")
        handed = check_hand_over(self.kernel, entry.config, args,
                                 self.guests.ram_files_in_use())
        vfio = check_vfio_hand_over(self.kernel, self.paths, entry.config, args,
                                    refusal(entry.config),
                                    groups_held(self.guests, list(self.registry.guests)))
        try:
            self.guests.attach(entry, handed, vfio)
        except (VfiodError, OSError, ValueError) as e:
            raise ApiError(ApiErrorCode.FAILED, f"attach {entry.name}: {e}; nothing was "
                           "attached") from None
        return {"guest": entry.name, "state": entry.state.value,
                "ram": sorted(handed),
                "devices": sorted(n for h in vfio.values() for n in h.devices)}

    def detach(self, args: DetachArgs) -> dict[str, Any]:
        """Give the VMM its RAM back: vfiod closes its copies of the fds and releases the
        guest (``defined``); refused while a migration holds it."""
        entry = self._guest(args.guest)
        with self.registry.lock:
            if not entry.config.vmm_ram:
                raise ApiError(ApiErrorCode.FAILED, f"detach {entry.name}: its RAM is not "
                               "from a VMM")
            if entry.migration is not None and entry.migration.active:
                raise ApiError(ApiErrorCode.BUSY, f"detach {entry.name}: a migration "
                               f"({entry.migration.role}, {entry.migration.peer}) holds it")
            if entry.state is LifecycleState.DEFINED:
                raise ApiError(ApiErrorCode.FAILED, f"detach {entry.name}: it is not "
                               "attached")
            if entry.state not in _DETACHABLE:
                raise ApiError(ApiErrorCode.BUSY, f"detach {entry.name}: it is "
                               f"{entry.state}; a migration must settle first")
        self.guests.close(entry, "detached: its VMM took its RAM back")
        return {"guest": entry.name, "state": entry.state.value}
