"""The daemon's read model: its guests (lifecycle state, devices, latest migration), the
migrations it runs or receives, and the counters and histograms the metrics endpoint
reads (docs/architecture.md §6, §7). Status answers (``status_rows()``), the Prometheus
collector and the STATUS line (``snapshot()``) read plain copies taken under the lock, so
a scrape never sees a half-updated migration.

One writer per piece: a guest's lifecycle state belongs to ``GuestLifecycle``
(``lifecycle.py``; ``GuestEntry.state`` only reads it), its device rows to
``GuestManager``, migration records and counters to this class's methods. No runtime
objects live here (open guests, sessions, cancel functions): their services keep them.
Nothing here talks to the kernel or to prometheus_client.

Migration ids are for logs and ``vfiod ctl status`` only; metrics use bounded labels.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from vfiod.daemon.config import GuestConfig
from vfiod.daemon.lifecycle import GuestLifecycle, LifecycleState

#: Seconds; around the 300 ms default downtime limit (docs/architecture.md §4, §6).
DOWNTIME_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
#: Seconds one dirty sync takes (an ioctl per container plus the merge).
SYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
RESULTS = ("completed", "failed", "cancelled")
PHASES = ("setup", "precopy", "stopcopy", "resume", "done")
#: How many finished migrations ``status`` keeps (the journal keeps the rest).
KEEP_FINISHED = 32
#: how a device's rollback ended, the bounded label of the recoveries counter
RECOVERY_OUTCOMES = ("running", "reset", "failed")


def recovery_outcome(rollback: Mapping[str, Any]) -> str:
    """One device's entry of a session result's ``rollback`` (``state``, ``rungs``) as a
    ``RECOVERY_OUTCOMES`` label: back to RUNNING, back to RUNNING through
    VFIO_DEVICE_RESET (the rung the recovery ladder names so), or anything else."""
    if rollback.get("state") != "RUNNING":
        return "failed"
    reset = any(str(r).startswith("VFIO_DEVICE_RESET") for r in rollback.get("rungs", ()))
    return "reset" if reset else "running"


class Buckets:
    """A cumulative histogram (the Prometheus shape) without prometheus_client."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds {bounds} must be increasing")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)     # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*map(repr, map(float, self.bounds)), "+Inf"), self.counts,
                            strict=True):
            total += n
            out.append((bound, total))
        return out

    def copy(self) -> Buckets:
        b = Buckets(self.bounds)
        b.counts, b.sum = list(self.counts), self.sum
        return b


@dataclass
class Progress:
    """A migration's latest numbers; the runner replaces fields as it learns them."""

    phase: str = "setup"
    iteration: int = 0
    ram_total_bytes: int = 0
    ram_sent_bytes: int = 0
    ram_remaining_bytes: int = 0
    device_remaining_bytes: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bandwidth_bps: float | None = None
    #: measured during a pass (the live figures); eta_s: the pass's rest plus switchover
    throughput_bps: float | None = None
    eta_s: float | None = None
    dirty_rate_bps: float | None = None
    predicted_downtime_s: float | None = None
    will_converge: bool | None = None
    reason: str = ""
    last_sync_s: float | None = None
    triple: str = ""


@dataclass(eq=False)           # identity: the migration service keys its handles by record
class MigrationRecord:
    id: str
    guest: str
    role: str                      # "source" | "destination"
    peer: str
    started: float                 # wall clock (time.time) for display
    state: str = "setup"           # MigrationState value (setup, active, device, ...)
    progress: Progress = field(default_factory=Progress)
    downtime_limit_ms: float | None = None
    timeout_s: float | None = None
    on_timeout: str | None = None
    result: str | None = None      # "completed" | "failed" | "cancelled" once finished
    error: str | None = None
    downtime_s: float | None = None
    predicted_downtime_s: float | None = None
    prediction_error: float | None = None
    verified: bool | None = None   # destination proved the content digests equal
    #: the destination's own part of the downtime (total_s, load_s, verify_s, resume_s)
    downtime_share: dict[str, float] | None = None
    #: the source's downtime part by part, ``{component: {"predicted_s", "actual_s"}}``
    #: (vfiod.migration.planning.breakdown): which part the prediction got wrong
    downtime_breakdown: dict[str, dict[str, float]] | None = None
    #: the source's: how many earlier switchovers corrected the prediction, and whether
    #: they were another guest's with the same devices (``{"switchovers", "borrowed"}``)
    prediction_lessons: dict[str, Any] | None = None
    #: a migration coordinated with QEMU's own (docs/architecture.md §8.3): QEMU's figures
    #: and the downtime split into QEMU's share and the devices', predicted and actual
    vmm: dict[str, Any] | None = None
    #: what the session said went wrong beside its result (a rollback step, a report not
    #: received, the outcome unknown after the commit ...): logged and shown by status
    warnings: list[str] = field(default_factory=list)
    finished: float | None = None

    @property
    def active(self) -> bool:
        return self.result is None

    def to_json(self) -> dict[str, Any]:
        """A plain copy, made by hand: ``status`` copies every record per request, and
        ``dataclasses.asdict``'s generic deep copy was most of its time (README "Load")."""
        out = {name: getattr(self, name) for name in _RECORD_FIELDS}
        out["progress"] = {name: getattr(self.progress, name) for name in _PROGRESS_FIELDS}
        out["warnings"] = list(self.warnings)
        if self.downtime_share is not None:
            out["downtime_share"] = dict(self.downtime_share)
        if self.prediction_lessons is not None:
            out["prediction_lessons"] = dict(self.prediction_lessons)
        if self.vmm is not None:
            out["vmm"] = {k: dict(v) if isinstance(v, dict) else v
                          for k, v in self.vmm.items()}
        return out


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(MigrationRecord))
_PROGRESS_FIELDS = tuple(f.name for f in dataclasses.fields(Progress))


@dataclass
class DeviceEntry:
    """One configured device of a guest, as the status and metrics show it."""

    name: str
    guest: str
    container: str
    protocol: str | None = None    # "v2" | "v1" | None (not migratable / not opened)
    capabilities: list[str] = field(default_factory=list)   # STOP_COPY, P2P, PRE_COPY...
    state: int | None = None       # vfio_device_mig_state value, read from the driver
    state_label: str = "-"
    pre_copy_dirty_page_tracking: bool = True
    tracker: str | None = None     # dirty provider the container would use
    dma_logging: bool = False
    migratable: bool = False
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        """A plain copy: the instance's own dict, which holds exactly the fields in their
        order (``__init__`` sets them so), copied in one call; ``status`` copies every
        device of every guest per request (docs/benchmarks.md §2)."""
        out = self.__dict__.copy()
        out["capabilities"] = list(self.capabilities)
        return out


class GuestEntry:
    """One configured guest. ``state`` and ``error`` are read-only: they come from the
    ``GuestLifecycle`` that owns them."""

    def __init__(self, config: GuestConfig, lifecycle: GuestLifecycle) -> None:
        self.config = config
        self.devices: dict[str, DeviceEntry] = {}
        self.migration: MigrationRecord | None = None
        #: what the daemon's restart did to the guest, and where it is (recovery.py)
        self.notes: list[str] = []
        #: an unsettled migration's status: its peer's last answer (resolution.py)
        self.unsettled: dict[str, Any] | None = None
        self._lifecycle = lifecycle

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> LifecycleState:
        return self._lifecycle.state(self.config.name)

    @property
    def error(self) -> str | None:
        """Why the guest is ``failed``; None in every other state."""
        return self._lifecycle.failure(self.config.name)

    def to_json(self) -> dict[str, Any]:
        """What ``status`` shows of the guest: a plain copy (registry lock held)."""
        return {
            "name": self.name, "state": self.state.value, "error": self.error,
            "ram_bytes": self.config.ram_bytes, "page_size": self.config.page_size,
            "start": self.config.start,
            "devices": [d.to_json() for d in self.devices.values()],
            "migration": self.migration.to_json() if self.migration else None,
            "notes": list(self.notes),
            "unsettled": dict(self.unsettled) if self.unsettled else None,
        }


class Registry:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.lock = threading.RLock()
        self.clock = clock
        #: the one writer of guest lifecycle states; it shares this lock
        self.lifecycle = GuestLifecycle(self.lock, clock)
        self._guests: dict[str, GuestEntry] = {}
        #: read-only: guests are added by ``add_guest`` only
        self.guests: Mapping[str, GuestEntry] = MappingProxyType(self._guests)
        self.finished: deque[MigrationRecord] = deque(maxlen=KEEP_FINISHED)
        self.migrations_total: dict[tuple[str, str], int] = {}
        #: (guest, device, outcome) -> devices rolled back after a failed or cancelled
        #: migration, by how their recovery ended
        self.device_recoveries_total: dict[tuple[str, str, str], int] = {}
        self.downtime = Buckets(DOWNTIME_BUCKETS)
        self.sync_duration = Buckets(SYNC_BUCKETS)
        self.requests_total: dict[str, int] = {"ok": 0, "error": 0}
        self.refused_peers_total = 0
        #: guests a restart recovered, by what it found (recovery.RECOVERY)
        self.recoveries_total: dict[str, int] = {}
        self.scrape_errors_total = 0
        #: called under the lock before each snapshot (refreshes device states from drivers)
        self.refreshers: list[Callable[[], None]] = []

    # -- guests ---------------------------------------------------------------------------
    def add_guest(self, config: GuestConfig) -> GuestEntry:
        """A configured guest, ``defined`` (``ValueError`` if the name is taken)."""
        with self.lock:
            self.lifecycle.add(config.name)
            entry = self._guests[config.name] = GuestEntry(config, self.lifecycle)
            return entry

    def guest(self, name: str) -> GuestEntry | None:
        with self.lock:
            return self._guests.get(name)

    # -- migrations ------------------------------------------------------------------------
    def begin_migration(self, guest: str, role: str, peer: str, *, migration_id: str = "",
                        **policy: Any) -> MigrationRecord:
        """Register a new migration of ``guest``; ``ValueError`` if one is running. A
        destination passes the source's ``migration_id`` so both ends log the same id."""
        with self.lock:
            entry = self._guests.get(guest)
            if entry is None:
                raise KeyError(guest)
            if entry.migration is not None and entry.migration.active:
                raise ValueError(f"guest {guest} is already migrating "
                                 f"({entry.migration.role}, id {entry.migration.id})")
            rec = MigrationRecord(migration_id or uuid.uuid4().hex[:12], guest,
                                  role, peer, self.clock(), **policy)
            entry.migration = rec
            return rec

    def update(self, rec: MigrationRecord, *, state: str | None = None,
               **progress: Any) -> None:
        with self.lock:
            if state is not None:
                rec.state = state
            for key, value in progress.items():
                if not hasattr(rec.progress, key):
                    raise AttributeError(f"Progress has no field {key!r}")
                setattr(rec.progress, key, value)

    def observe_sync(self, seconds: float) -> None:
        with self.lock:
            self.sync_duration.observe(seconds)

    def finish(self, rec: MigrationRecord, result: str, *, error: str | None = None,
               downtime_s: float | None = None, predicted_s: float | None = None,
               verified: bool | None = None,
               downtime_share: dict[str, float] | None = None,
               downtime_breakdown: dict[str, dict[str, float]] | None = None,
               prediction_lessons: dict[str, Any] | None = None,
               rollback: Mapping[str, Mapping[str, Any]] | None = None,
               vmm: dict[str, Any] | None = None) -> None:
        """End ``rec`` with ``result`` and the session's figures; ``rollback``: the
        session result's per-device rollback entries, counted by ``recovery_outcome``."""
        if result not in RESULTS:
            raise ValueError(f"migration result {result!r} is not one of {RESULTS}")
        with self.lock:
            if rec.result is not None:
                return                      # finished once; a late duplicate is ignored
            rec.result, rec.error, rec.finished = result, error, self.clock()
            rec.state = result
            rec.progress.phase = "done"
            rec.verified = verified
            rec.downtime_share = downtime_share or None
            rec.downtime_breakdown = downtime_breakdown or None
            rec.prediction_lessons = prediction_lessons
            rec.vmm = vmm or None
            if downtime_s is not None:
                rec.downtime_s = downtime_s
                if rec.role == "source":    # the destination repeats the source's figure:
                    self.downtime.observe(downtime_s)   # counting it twice would skew sums
            if predicted_s is not None:
                rec.predicted_downtime_s = predicted_s
                if downtime_s:
                    rec.prediction_error = abs(predicted_s - downtime_s) / downtime_s
            key = (rec.guest, result)
            self.migrations_total[key] = self.migrations_total.get(key, 0) + 1
            recoveries = self.device_recoveries_total
            for device, entry in (rollback or {}).items():
                rkey = (rec.guest, device, recovery_outcome(entry))
                recoveries[rkey] = recoveries.get(rkey, 0) + 1
            self.finished.append(rec)

    def count_request(self, ok: bool) -> None:
        with self.lock:
            self.requests_total["ok" if ok else "error"] += 1

    def count_refused_peer(self) -> None:
        with self.lock:
            self.refused_peers_total += 1

    def count_recovery(self, outcome: str) -> None:
        with self.lock:
            self.recoveries_total[outcome] = self.recoveries_total.get(outcome, 0) + 1

    def count_scrape_error(self) -> None:
        with self.lock:
            self.scrape_errors_total += 1

    # -- reading ---------------------------------------------------------------------------
    def status_rows(self, only: str | None = None
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Copies of the guests and of the finished migrations, device states refreshed
        first, as ``status`` shows them; ``only``: that one guest's."""
        with self.lock:
            for refresh in self.refreshers:
                refresh()
            return ([g.to_json() for g in self._guests.values()
                     if only is None or g.name == only],
                    [m.to_json() for m in self.finished if only is None or m.guest == only])

    def snapshot(self, only: str | None = None) -> dict[str, Any]:
        """A deep copy of everything, for the metrics collector and the STATUS line;
        ``only``: the guests and finished migrations of that one guest."""
        with self.lock:
            guests, finished = self.status_rows(only)
            return {
                "guests": guests,
                "finished": finished,
                "migrations_total": dict(self.migrations_total),
                "device_recoveries_total": dict(self.device_recoveries_total),
                "downtime": self.downtime.copy(),
                "sync_duration": self.sync_duration.copy(),
                "requests_total": dict(self.requests_total),
                "refused_peers_total": self.refused_peers_total,
                "recoveries_total": dict(self.recoveries_total),
                "scrape_errors_total": self.scrape_errors_total,
            }
