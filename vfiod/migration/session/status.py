"""Progress and status of a migration session: one record per pre-copy iteration, and a
snapshot a control client, the metrics collector or the demo can read at any time
(docs/architecture.md §1 "status shows the triple", §4 prediction, §6 ``vfiod ctl status``/``watch``).

The triple is (guest run state, migration state, device state) in the seed's flow-diagram
words (``states.device_label``; device states are docs/kernel-contract.md §6.4's, v1 bits §5.3
decoded into them), e.g. ``(RUNNING, ACTIVE, RUNNING|SAVING)``. A guest with
several devices shows one triple per device; ``triple`` joins the distinct device labels
with ``/`` in device order, e.g. ``(RUNNING, ACTIVE, RUNNING|SAVING/RUNNING)``.

Everything here is plain data (dataclasses with ``to_dict``): no locks, no I/O. The session
builds a new snapshot on request from its own fields; the dirty tracker's part is its typed
``TrackerStatus``, which ``tracker_view`` formats for display with the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vfiod.dirty.tracker_status import ContainerStatus, TrackerStatus
from vfiod.migration.states import GuestState, MigrationState, MigState, device_label


@dataclass(frozen=True)
class IterationProgress:
    """One pre-copy pass, as printed on the terminal and kept in the result."""

    iteration: int
    elapsed_s: float
    ram_sent_bytes: int            # RAM payload sent in this pass
    device_sent_bytes: int         # device pre-copy data read and sent in this pass
    total_sent_bytes: int          # stream bytes so far
    remaining_bytes: int           # what the predictor expects stop-and-copy to move
    dirty_ram_bytes: int
    device_bytes: int
    dirty_rate_bps: float | None
    bandwidth_bps: float
    bandwidth_source: str
    predicted_downtime_s: float
    will_converge: bool
    decision: str                  # continue | switchover | force | cancel
    reason: str
    sync_s: float                  # duration of this pass's dirty sync
    #: part of dirty_ram_bytes that opted-out containers count dirty without asking
    assumed_dirty_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LiveProgress:
    """Figures refreshed during a pass, slice by slice, not only at its end
    (docs/architecture.md §4 prediction, §6 ``vfiod ctl watch``).

    ``eta_s`` is what is left of this pass at the measured throughput plus the switchover
    the last prediction expects (none before the first pass ends); passes after this one
    are not in it (the policy decides whether there are any).
    """

    iteration: int
    bytes_sent: int                # stream bytes so far
    ram_remaining_bytes: int       # pages of this pass not sent yet
    device_remaining_bytes: int    # device data pending at the last pass's query
    throughput_bps: float | None   # over the bandwidth estimator's recent windows
    predicted_switchover_s: float | None
    eta_s: float | None


def live_progress(iteration: int, bytes_sent: int, ram_remaining: int,
                  throughput_bps: float | None, last: IterationProgress | None
                  ) -> LiveProgress:
    """The live figures; the device's share and the switchover come from ``last`` pass."""
    device = last.device_bytes if last is not None else 0
    switchover = last.predicted_downtime_s if last is not None else None
    eta = None
    if throughput_bps:
        eta = (ram_remaining + device) / throughput_bps + (switchover or 0.0)
    return LiveProgress(iteration, bytes_sent, ram_remaining, device, throughput_bps,
                        switchover, eta)


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _rate(bps: float | None) -> str:
    return "?" if bps is None else f"{bps / 1e6:.1f} MB/s"


def format_progress_line(p: IterationProgress) -> str:
    """One terminal line: iteration, sent, remaining, dirty rate, bandwidth, prediction."""
    conv = "" if p.will_converge else "  (will not converge)"
    return (f"iter {p.iteration:>3}  sent {_size(p.ram_sent_bytes + p.device_sent_bytes):>10}"
            f"  remaining {_size(p.remaining_bytes):>10}"
            f"  dirty {_rate(p.dirty_rate_bps):>11}  bw {_rate(p.bandwidth_bps):>11}"
            f"  predicted downtime {p.predicted_downtime_s * 1000:7.1f} ms"
            f"  -> {p.decision}{conv}")


@dataclass(frozen=True)
class DeviceStatus:
    name: str
    protocol: str
    state: str                     # MigState name
    label: str                     # flow-diagram label (RUNNING|SAVING ...)
    triple: str
    pre_copy_dirty_page_tracking: bool
    hook: str | None = None        # the hook running now (None between hooks)


def device_column(states: Sequence[MigState | None]) -> str:
    """The triple's device part for several devices: distinct labels in order."""
    labels: list[str] = []
    for st in states:
        lab = device_label(st)
        if lab not in labels:
            labels.append(lab)
    return "/".join(labels) if labels else "-"


def triple(guest: GuestState | None, migration: MigrationState | None,
           states: Sequence[MigState | None]) -> str:
    g = guest.name if guest is not None else "-"
    m = migration.name if migration is not None else "-"
    return f"({g}, {m}, {device_column(states)})"


@dataclass(frozen=True)
class StatusSnapshot:
    role: str                      # source | destination
    guest: str
    migration_id: str
    guest_state: str
    migration_state: str
    triple: str
    devices: tuple[DeviceStatus, ...]
    iteration: int
    elapsed_s: float
    bytes_sent: int
    bytes_received: int
    last: IterationProgress | None
    predicted_downtime_s: float | None
    actual_downtime_s: float | None
    error: str | None
    tracker: TrackerStatus | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    live: LiveProgress | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["devices"] = [asdict(x) for x in self.devices]
        d["last"] = self.last.to_dict() if self.last is not None else None
        d["tracker"] = tracker_view(self.tracker) if self.tracker is not None else None
        d["notes"] = list(self.notes)
        return d


def _container_view(c: ContainerStatus) -> dict[str, Any]:
    d = asdict(c)
    for key in ("opt_out_devices", "fallbacks", "errors", "notes"):
        d[key] = list(d[key])
    return d


def tracker_view(t: TrackerStatus) -> dict[str, Any]:
    """The dirty tracker's snapshot as status shows it (JSON-ready)."""
    d = asdict(t)
    d["containers"] = [_container_view(c) for c in t.containers]
    return d


def device_statuses(guest_state: GuestState, migration: MigrationState,
                    devices: Sequence[tuple[str, str, MigState, bool]],
                    hooks: Mapping[str, str] | None = None) -> tuple[DeviceStatus, ...]:
    """``devices``: (name, protocol, state, pre_copy_dirty_page_tracking) each."""
    hooks = hooks or {}
    out = []
    for name, proto, st, pre in devices:
        out.append(DeviceStatus(name, proto, st.name, device_label(st),
                                triple(guest_state, migration, [st]), pre, hooks.get(name)))
    return tuple(out)
