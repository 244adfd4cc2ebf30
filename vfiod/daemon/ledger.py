"""The daemon's running migrations, kept together (docs/architecture.md §6, §7): each one's record
in the ``Registry``, its guest's lifecycle steps (``GuestLifecycle``) and its runtime
handle (the cancel and the live status of its session, which are no part of the read
model). ``begin`` and ``end`` change all three in one hold of the registry lock, so
status never shows a migration ended while its guest is still in a state it has left,
nor a guest migrating without a record.

A running migration holds its guest (``holds``) from ``begin`` to ``end``: its thread uses
the guest's fds, so the stop does not close them (guests.py ``close_all``). ``close``,
at the stop, cancels every running migration and refuses every later ``begin`` in the
same hold of the lock, so none starts unseen while the stop waits.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from vfiod.daemon.lifecycle import OUTGOING, LifecycleState
from vfiod.daemon.registry import GuestEntry, MigrationRecord, Registry
from vfiod.errors import VfiodError
from vfiod.migration.session.common import MigrationResult, SessionBase

#: Lifecycle steps taken with a migration's start or end: (new state, cause).
Moves = Sequence[tuple[LifecycleState, str]]

CANCEL_REASON = "cancelled by the operator (vfiod ctl cancel)"
SHUTDOWN_REASON = "the daemon is shutting down (SIGTERM, systemctl stop)"


class MigrationHandle:
    """A running migration as other threads reach it: its cancel (kept if it comes
    before the session exists, while connecting) and the session's live status."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.reason = CANCEL_REASON            # the first cancel's reason ...
        self.by = "operator"                   # ... and who asked ("cancelled by shutdown")
        self._session: SessionBase | None = None
        self._lock = threading.Lock()

    def cancel(self, reason: str = CANCEL_REASON, by: str = "operator") -> None:
        with self._lock:
            if not self.cancelled.is_set():
                self.reason, self.by = reason, by
            self.cancelled.set()
            session = self._session
        if session is not None:
            session.cancel(self.reason, self.by)

    def attach(self, session: SessionBase) -> None:
        with self._lock:
            self._session = session
            if self.cancelled.is_set():
                session.cancel(self.reason, self.by)

    def live(self) -> dict[str, Any] | None:
        with self._lock:
            session = self._session
        return session.status().to_dict() if session is not None else None


class MigrationLedger:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.lifecycle = registry.lifecycle
        self._handles: dict[MigrationRecord, MigrationHandle] = {}
        self._closed: str | None = None        # why no migration may begin any more
        self._lock = threading.Lock()          # both; taken after the registry lock

    def begin(self, guest: str, role: str, peer: str, *, migration_id: str = "",
              moves: Moves = (), **policy: Any) -> tuple[MigrationRecord, MigrationHandle]:
        """Register a migration (``ValueError`` if one of the guest runs), take its first
        lifecycle steps and keep its handle. The caller holds the registry lock and
        checked that the guest may take those steps. Refused (``ValueError``) once the
        ledger is closed."""
        with self.registry.lock:
            with self._lock:
                if self._closed is not None:
                    raise ValueError(f"{self._closed}: no migration starts now")
            rec = self.registry.begin_migration(guest, role, peer, migration_id=migration_id,
                                                **policy)
            try:            # a migration the journal cannot name must not start
                self.move(rec, moves, must_record=True)
            except VfiodError:
                self.registry.finish(rec, "failed", error="its start could not be journaled")
                raise
            with self._lock:
                handle = self._handles[rec] = MigrationHandle()
            return rec, handle

    def move(self, rec: MigrationRecord, moves: Moves, *, must_record: bool = False) -> None:
        """The guest's lifecycle steps for ``rec`` (``must_record``: see
        ``GuestLifecycle.move``)."""
        for state, cause in moves:
            self.lifecycle.move(rec.guest, state, cause, migration_id=rec.id, peer=rec.peer,
                                must_record=must_record)

    def released_to_return(self, rec: MigrationRecord) -> None:
        """A source's last step after its guest migrated away: ``defined``, to be re-opened
        ``incoming`` (it may come back); the caller closed the guest's fds first."""
        self.move(rec, [(LifecycleState.DEFINED, "released, to be re-opened: it may come back")])

    def end(self, rec: MigrationRecord, result: str, moves: Moves = (), *,
            res: MigrationResult | None = None, error: str | None = None) -> None:
        """The migration's last lifecycle steps, its handle dropped and its record
        finished (with the session's numbers, if one ran)."""
        with self.registry.lock:
            try:
                self.move(rec, moves)
            finally:                # a refused step still ends the record; then it raises
                with self._lock:
                    self._handles.pop(rec, None)
                if res is None:
                    self.registry.finish(rec, result, error=error)
                else:
                    sent = res.stream_bytes if rec.role == "source" else 0
                    self.registry.update(rec, bytes_sent=sent,
                                         bytes_received=res.stream_bytes - sent)
                    self.registry.finish(rec, result, error=res.reason or None,
                                         downtime_s=res.actual_downtime_s,
                                         predicted_s=res.predicted_downtime_s,
                                         verified=res.verified,
                                         downtime_share=res.downtime_share,
                                         downtime_breakdown=res.downtime_breakdown,
                                         prediction_lessons=prediction_lessons(res),
                                         rollback=res.rollback, vmm=res.vmm)

    def crashed(self, rec: MigrationRecord, reason: str) -> None:
        """End an outgoing migration whose thread broke: what it did to the guest is
        unknown, so a guest it still held is failed (not ours to migrate again until an
        operator looks)."""
        with self.registry.lock:
            stuck = self.lifecycle.state(rec.guest) in OUTGOING
            self.end(rec, "failed", [(LifecycleState.FAILED, reason)] if stuck else (),
                     error=reason)

    def abandon(self, why: str) -> None:
        """Fail every guest an outgoing migration still holds (so it can be released)."""
        with self.registry.lock:
            for name, state in self.lifecycle.states().items():
                if state in OUTGOING:
                    self.lifecycle.move(name, LifecycleState.FAILED, why)

    def close(self, reason: str, by: str) -> int:
        """At the stop: refuse every later ``begin`` and cancel every running migration
        (one that is past its commit refuses and runs on). Returns how many were asked."""
        with self.registry.lock, self._lock:
            self._closed = reason
            handles = list(self._handles.values())
        for handle in handles:
            handle.cancel(reason, by)
        return len(handles)

    def park(self, rec: MigrationRecord) -> None:
        """Its thread ended but the record stays open: an unsettled outcome
        (``resolution.py``), which no thread holds until it is settled."""
        with self._lock:
            self._handles.pop(rec, None)

    def holds(self, guest: str) -> bool:
        """Whether a running migration holds ``guest`` (its thread may use its fds)."""
        with self._lock:
            return any(rec.guest == guest for rec in self._handles)

    def running(self) -> list[MigrationRecord]:
        with self._lock:
            return list(self._handles)

    # -- from other threads ----------------------------------------------------------------
    def live_status(self) -> dict[str, dict[str, Any]]:
        """Each running session's own status, by guest (read outside every lock: a
        session answers from its own)."""
        with self._lock:
            running = [(rec.guest, h) for rec, h in self._handles.items()]
        out: dict[str, dict[str, Any]] = {}
        for guest, handle in running:
            try:
                live = handle.live()
            except Exception as e:  # noqa: BLE001 - status must answer even mid-teardown
                live = {"error": f"{type(e).__name__}: {e}"}
            if live is not None:
                out[guest] = live
        return out

    def cancel(self, entry: GuestEntry, reason: str = CANCEL_REASON,
               by: str = "operator") -> MigrationRecord | None:
        """Ask the guest's running migration to cancel (``by``: who asks); None if none
        runs."""
        with self.registry.lock:
            rec = entry.migration
            if rec is None or not rec.active:
                return None
            with self._lock:
                handle = self._handles.get(rec)
        if handle is None:
            return None
        handle.cancel(reason, by)
        return rec


def prediction_lessons(res: MigrationResult) -> dict[str, Any] | None:
    """The source's earlier switchovers behind its prediction (None on a destination, or
    a session that predicted nothing): ``{"switchovers": N, "borrowed": bool}``."""
    n = res.timings.get("history_switchovers")
    if n is None:
        return None
    return {"switchovers": int(n), "borrowed": bool(res.timings.get("history_borrowed"))}
