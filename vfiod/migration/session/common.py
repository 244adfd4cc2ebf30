"""Migration sessions: what both ends share (docs/architecture.md §1 steps 5-6, §4, §5; the flows
of docs/kernel-contract.md §5.4-§5.6 for v1 and §6.10 for v2, through the drivers).

A session moves one guest. ``SourceSession`` (``source``) and ``DestinationSession``
(``dest``) each drive their side over one ``Link`` and return a ``MigrationResult``; this
module holds what they share:

* ``SessionConfig``: the policy (downtime limit, maximum iterations, timeout with
  ``on_timeout`` cancel|force), timeouts and batch sizes;
* the migration-state handler: ``add_state_handler(fn(old, new))`` hears every change of
  ``MigrationState`` (SETUP, ACTIVE, DEVICE, COMPLETED, FAILED, CANCELLING, CANCELLED);
  the guest-run-state handler lives on the ``Guest``;
* ``cancel(reason)``: from any thread; honoured at the next safe point until the commit
  point: the source's journaled decision to commit, the destination's PREPARED answer.
  After it, neither end resumes or discards on its own (docs/architecture.md §1.7);
* ``SwitchoverJournal``: what a session writes down durably before the step it allows
  (the daemon's journal; ``UNJOURNALED`` in-process);
* hook calls: every driver hook is a method of the device's ``MigrationDriver``, called
  through ``_hook`` so status names the hook running on each device and a failure names it;
* the end of every device's part: ``cleanup`` after a completed migration, ``rollback``
  after a failed one (docs/architecture.md §1.6), each device's tried whatever the others did;
* ``status()``: a ``StatusSnapshot`` with the (guest, migration, device) triple.
Sessions take a ``KernelOps``-backed ``Guest`` and a ``Link``, nothing from the simulator."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, ParamSpec, TypeVar

from vfiod.dirty.tracker_status import TrackerStatus
from vfiod.errors import KernelError, MigrationError, ProtocolError
from vfiod.migration.device.errors import DeviceTransitionError
from vfiod.migration.guest import Guest, GuestDevice
from vfiod.migration.planning.hostfacts import HostFacts
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.planning.preflight import GuestFacts, MigrationFacts
from vfiod.migration.session.link import Link
from vfiod.migration.session.status import (
    IterationProgress,
    LiveProgress,
    StatusSnapshot,
    device_statuses,
    triple,
)
from vfiod.migration.session.switchover import UNJOURNALED, SwitchoverJournal
from vfiod.migration.states import MigrationState
from vfiod.migration.transport.control import ControlMessage

MiB = 1 << 20

#: (old, new) migration state; called synchronously on the session's thread.
StateHandler = Callable[[MigrationState, MigrationState], None]

_HookArgs = ParamSpec("_HookArgs")
_HookResult = TypeVar("_HookResult")


@dataclass(frozen=True)
class SessionConfig:
    policy: Policy = field(default_factory=Policy)
    #: how long to wait for each acknowledgement of the peer
    ack_timeout_s: float = 60.0
    #: RAM handed to the stream per call: between calls the session samples bandwidth,
    #: checks for cancel and polls the return path
    slice_bytes: int = 32 * MiB
    #: device pre-copy data read per device per pass
    device_iterate_bytes: int = 8 * MiB
    #: longest run of pages taken from the dirty bitmap at once
    max_run_pages: int = 1024
    #: first pass: send only pages holding data (pread scan; holes stay holes)
    zero_scan_first_pass: bool = True
    #: source: close device/container fds once the destination acknowledged
    release_on_complete: bool = True
    record_bytes: int = 4 * MiB
    batch_bytes: int = 16 * MiB
    channels: int = 1   # source: RAM channels wanted (docs/protocol.md §12), 1: none
    #: a pre-copy pass that found nothing to send waits this long (or until a cancel)
    #: before syncing again, so a guest whose remaining work is only what pre-copy cannot
    #: shrink (an opted-out container, device stop-copy state) does not spin the CPU
    idle_pass_s: float = 0.05
    #: iterations kept in ``MigrationResult.history`` (the count stays in ``iterations``)
    history_limit: int = 2000
    #: destination: how long it waits, with the guest running, for the source's REPORT
    report_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.idle_pass_s < 0 or self.history_limit < 1:
            raise ValueError("session config: idle_pass_s must be >= 0 and history_limit "
                             f">= 1, not {self.idle_pass_s} and {self.history_limit}")
        for name in ("ack_timeout_s", "slice_bytes", "device_iterate_bytes",
                     "max_run_pages", "report_timeout_s", "channels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"session config: {name} must be positive, not "
                                 f"{getattr(self, name)}")


class Cancelled(MigrationError):
    """The migration was cancelled (operator, peer, or the timeout policy)."""

    def __init__(self, reason: str, by: str = "operator") -> None:
        self.reason = reason
        self.by = by
        super().__init__(f"cancelled by {by}: {reason}")


class VerificationError(MigrationError):
    """The destination's RAM or device state does not match what the source had."""


@dataclass
class MigrationResult:
    role: str
    guest: str
    migration_id: str
    #: completed | failed | cancelled, or unsettled: committed (source) or prepared
    #: (destination) with the peer's word missing; ``settle`` ends it (§1.7)
    result: str
    state: str                           # final MigrationState name
    reason: str = ""
    iterations: int = 0
    ram_bytes_sent: int = 0
    device_bytes_sent: int = 0
    stream_bytes: int = 0
    predicted_downtime_s: float | None = None
    actual_downtime_s: float | None = None
    prediction_error: float | None = None
    verified: bool | None = None
    verification: dict[str, Any] = field(default_factory=dict)
    rollback: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    failed_hook: str | None = None
    history: list[IterationProgress] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    peer: dict[str, Any] = field(default_factory=dict)
    #: the destination's own part of the downtime: ``total_s`` from the source's stopped
    #: state arriving to the guest resumed, and its ``load_s``, ``verify_s``, ``resume_s``
    downtime_share: dict[str, float] = field(default_factory=dict)
    #: source: ``{component: {"predicted_s", "actual_s"}}`` of the downtime
    #: (``vfiod.migration.planning.breakdown``)
    downtime_breakdown: dict[str, dict[str, float]] = field(default_factory=dict)
    #: coordinated with the VMM's migration (§8.3): its figures, the downtime's halves
    vmm: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = [p.to_dict() for p in self.history]
        return d

    def take_verification_ack(self, fields: dict[str, Any]) -> None:
        """The source: what the destination says it verified, in its ACK prepared and again
        in its ACK resumed."""
        peer = {k: v for k, v in fields.items() if k != "value"}
        self.peer.update(peer)
        self.verified = bool(peer.get("verified"))
        self.verification["destination"] = peer.get("verification", {})

    def downtime_report(self) -> ControlMessage:
        """The source's REPORT: its measured downtime, prediction and error."""
        if self.actual_downtime_s is None:
            raise ValueError("downtime report before the downtime was measured")
        return ControlMessage.report(self.actual_downtime_s, self.predicted_downtime_s,
                                     self.prediction_error)

    def take_downtime_report(self, fields: dict[str, Any]) -> None:
        """The destination: the source's REPORT (``ProtocolError`` if a figure is not a
        number, or the downtime is missing)."""
        got = {k: fields.get(k) for k in _REPORTED}
        if not isinstance(got["actual_downtime_s"], int | float) or not all(
                v is None or isinstance(v, int | float) and not isinstance(v, bool)
                for v in got.values()):
            raise ProtocolError(f"source report: not numbers: {got}")
        self.actual_downtime_s = float(got["actual_downtime_s"])
        pred, err = got["predicted_downtime_s"], got["prediction_error"]
        self.predicted_downtime_s = None if pred is None else float(pred)
        self.prediction_error = None if err is None else float(err)


#: the figures a REPORT carries (docs/protocol.md §8.2)
_REPORTED = ("actual_downtime_s", "predicted_downtime_s", "prediction_error")


def guest_facts(guest: Guest, memory_encryption: str = "none") -> GuestFacts:
    return GuestFacts(guest.name, guest.page_size, guest.ram_regions(), guest.device_infos(),
                      pinned_bytes=guest.ram_bytes if guest.containers else 0,
                      memory_encryption=memory_encryption)


class SessionBase:
    role = ""
    #: called after every pre-copy pass with its record (the source's passes)
    progress: Callable[[IterationProgress], None] | None = None
    #: called during a pass, at a bounded rate, with the live figures
    live: Callable[[LiveProgress], None] | None = None

    def __init__(self, guest: Guest, link: Link, *, host: HostFacts,
                 config: SessionConfig | None = None, memory_encryption: str = "none",
                 clock: Callable[[], float] = time.monotonic,
                 migration_id: str | None = None,
                 journal: SwitchoverJournal = UNJOURNALED) -> None:
        self.guest = guest
        self.link = link
        self.config = config or SessionConfig()
        self.clock = clock
        self.journal = journal
        #: given by the daemon (the offer's id): the stream must carry the same one
        self.assigned_migration_id = migration_id
        self.migration_id = migration_id or uuid.uuid4().hex[:12]
        #: the destination's random challenge of this connection (docs/protocol.md §8.4)
        self.challenge = ""
        self.facts = MigrationFacts(host, guest_facts(guest, memory_encryption))
        self.state = MigrationState.NONE
        self._handlers: list[StateHandler] = []
        self._cancel = threading.Event()
        self._cancel_reason = ""
        self._cancel_by = "operator"
        self._lock = threading.Lock()
        self._committed = False
        self._hooks: dict[str, str] = {}
        self.started_at: float | None = None
        self.iteration = 0
        self.error: str | None = None
        self.result = MigrationResult(self.role, guest.name, self.migration_id, "", "NONE")

    # -- migration-state handler -------------------------------------------------------
    def add_state_handler(self, handler: StateHandler) -> None:
        self._handlers.append(handler)

    def _set_state(self, new: MigrationState) -> None:
        old = self.state
        if old is new:
            return
        self.state = new
        for h in list(self._handlers):
            try:
                h(old, new)
            except Exception as e:  # noqa: BLE001 - a listener must not break the session
                self.result.warnings.append(f"state handler failed on {old.name} -> "
                                            f"{new.name}: {type(e).__name__}: {e}")

    # -- cancel -----------------------------------------------------------------------
    def cancel(self, reason: str = "operator cancelled", by: str = "operator") -> bool:
        """Ask the session to cancel (``by``: who asked, e.g. "operator", "shutdown");
        False when it is too late (committed or finished)."""
        with self._lock:
            if self._committed or self.state.finished:
                return False
            self._cancel_reason, self._cancel_by = reason, by
            self._cancel.set()
            return True

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled(self._cancel_reason or "cancelled", by=self._cancel_by)

    def _commit(self) -> None:
        """Past this point a cancel is refused (docs/architecture.md §1.7)."""
        with self._lock:
            self._check_cancel()
            self._committed = True

    def _commit_recorded(self, record: Callable[[str], None]) -> None:
        """The commit point, written down first: ``record`` (a ``SwitchoverJournal``
        step) makes it durable; if it cannot, nothing was promised and it raises with the
        session uncommitted (the caller rolls back or discards)."""
        self._commit()
        try:
            record(self.migration_id)
        except BaseException:
            with self._lock:
                self._committed = False
            raise

    def _leave_unsettled(self, exc: Exception, missing: str, kept: str,
                         reason: str) -> MigrationResult:
        """The peer's word after the commit point did not come: the result says so, and
        what this end keeps until ``settle`` (docs/architecture.md §1.7)."""
        self.error = f"{type(exc).__name__}: {exc}"
        self.result.warnings.append(f"{missing} did not arrive ({exc}): {kept}")
        self._set_state(MigrationState.UNSETTLED)
        return self._result("unsettled", f"{reason}: {exc}")

    def _settling(self) -> None:
        if self.state is not MigrationState.UNSETTLED:
            raise ValueError(f"migration {self.migration_id} is {self.state.value}, not "
                             "unsettled")

    @property
    def committed(self) -> bool:
        return self._committed

    # -- hooks ------------------------------------------------------------------------
    def _hook(self, dev: GuestDevice, hook: Callable[_HookArgs, _HookResult],
              *args: _HookArgs.args, **kwargs: _HookArgs.kwargs) -> _HookResult:
        """Call ``hook``, a method of ``dev.driver``: status shows it (by its name) while
        it runs, and a failure names it with the device."""
        name = hook.__name__
        self._hooks[dev.name] = name
        try:
            return hook(*args, **kwargs)
        except BaseException:
            self.result.failed_hook = f"{name} on {dev.name}"
            raise
        finally:
            self._hooks.pop(dev.name, None)

    # -- the devices' end -------------------------------------------------------------
    def _cleanup_devices(self) -> None:
        """``cleanup`` every device after completion: a failure is a warning, the
        migration stands."""
        for d in self.guest.devices:
            try:
                self._hook(d, d.driver.cleanup)   # v2 source: STOP_COPY -> STOP, fd closed
            except KernelError as e:
                self.result.warnings.append(f"cleanup on {d.name} after completion: {e}")

    def _rollback_devices(self, devices: Iterable[GuestDevice]) -> None:
        """Every device of ``devices`` back to RUNNING (its driver's ``rollback``), each one
        tried whatever the others did; the result says each final state, rungs and error."""
        states: dict[str, Any] = {}
        for d in devices:
            try:
                st = d.driver.rollback()
                states[d.name] = {"state": st.name, "rungs": list(d.driver.rollback_log)}
            except DeviceTransitionError as e:
                states[d.name] = {"state": e.final.name if e.final else "unknown",
                                  "rungs": e.rungs, "error": str(e)}
            except Exception as e:  # noqa: BLE001 - every device gets its rollback
                states[d.name] = {"state": "unknown", "error": f"{type(e).__name__}: {e}"}
            if (st_d := states[d.name])["state"] != "RUNNING":   # the guest may run on: say it
                self.result.warnings.append(f"device {d.name} is {st_d['state']} after the "
                                            f"rollback: {st_d.get('error')}")
        self.result.rollback = states

    # -- status -----------------------------------------------------------------------
    def _last_progress(self) -> IterationProgress | None:
        return self.result.history[-1] if self.result.history else None

    def _tracker_status(self) -> TrackerStatus | None:
        return None

    def _live(self) -> LiveProgress | None:
        return None

    def _record_pass(self, prog: IterationProgress) -> None:
        """Keep a pass's record (the newest ``history_limit``) and tell ``progress``."""
        self.result.history.append(prog)
        if len(self.result.history) > self.config.history_limit:
            del self.result.history[0]
        self.result.predicted_downtime_s = prog.predicted_downtime_s
        if self.progress is not None:
            self._tell(self.progress, prog, "progress")

    def _publish_live(self) -> None:
        live = self._live()
        if self.live is not None and live is not None:
            self._tell(self.live, live, "live progress")

    def _tell(self, callback: Callable[[Any], None], arg: Any, what: str) -> None:
        try:
            callback(arg)
        except Exception as e:  # noqa: BLE001 - a display must not fail a migration
            warning = f"{what} callback failed: {e}"
            if warning not in self.result.warnings:     # once, not every slice
                self.result.warnings.append(warning)

    def _bytes(self) -> tuple[int, int]:
        return self.result.stream_bytes, 0

    def _result(self, kind: str, reason: str) -> MigrationResult:
        """The result as it ends: ``kind`` completed | failed | cancelled."""
        r = self.result
        r.result, r.state, r.reason = kind, self.state.name, reason
        r.iterations = self.iteration
        if self.started_at is not None:
            r.timings["total_s"] = self.clock() - self.started_at
        return r

    def status(self) -> StatusSnapshot:
        g = self.guest
        devs = [(d.name, d.driver.protocol, d.driver.state(), d.pre_copy_dirty_page_tracking)
                for d in g.devices]
        last = self._last_progress()
        sent, received = self._bytes()
        return StatusSnapshot(
            role=self.role, guest=g.name, migration_id=self.migration_id,
            guest_state=g.run_state.name, migration_state=self.state.name,
            triple=triple(g.run_state, self.state, [s for _, _, s, _ in devs]),
            devices=device_statuses(g.run_state, self.state, devs, dict(self._hooks)),
            iteration=self.iteration,
            elapsed_s=0.0 if self.started_at is None else self.clock() - self.started_at,
            bytes_sent=sent, bytes_received=received, last=last,
            predicted_downtime_s=last.predicted_downtime_s if last else
            self.result.predicted_downtime_s,
            actual_downtime_s=self.result.actual_downtime_s, error=self.error,
            tracker=self._tracker_status(), notes=tuple(self.result.warnings),
            live=self._live())
