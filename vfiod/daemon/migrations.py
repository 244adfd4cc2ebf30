"""Running migrations for the daemon: outgoing ones ordered over the control socket, and
incoming ones accepted on the migration listener (design.md §1 steps 5-6, §6).

Each migration runs a ``vfiod.migration`` session on its own thread; this module wires
it to the daemon: the offer (``offer.py``) says which guest a connection is for, the
session's state handler and progress callback update the ``Registry`` (status, metrics),
``cancel`` reaches the session from any thread (this service keeps each running
migration's cancel and live status, keyed by its record), and each step moves the guest's
lifecycle (``lifecycle.py``):

    source       running → migrating-out (ordered) → switching-over (stop-and-copy)
                 → migrated-away (the peer resumed it; then re-opened fresh: defined →
                 claimed → incoming, it may come back), or back to running (cancelled or
                 failed: rolled back)
    destination  incoming → loaded → running (received, verified, resumed here); a
                 failed receive is discarded (→ defined) and re-opened fresh (claimed →
                 incoming): a destination must start from zeroed memory

The last lifecycle steps of a migration and the end of its record are one write under the
registry lock, so status never shows a finished migration with its guest in a state it
has left: a guest to be re-opened (migrated away, or a discarded receive) is released
(``defined``) in that write, and ``GuestManager.reopen`` then opens it fresh.

Shutdown cancels every running migration (a source rolls back: devices RUNNING, tracking
stopped, the guest resumed) and waits for the threads, bounded by a deadline; a guest
whose outgoing migration outlives it is marked failed (what its thread did is unknown).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from vfiod.daemon.config import MigrationConfig
from vfiod.daemon.guests import GuestManager
from vfiod.daemon.lifecycle import OUTGOING, LifecycleState
from vfiod.daemon.offer import Offer, OfferError, accept_offer, read_offer, refuse_offer, send_offer
from vfiod.daemon.registry import GuestEntry, MigrationRecord, Registry
from vfiod.migration.guest import Guest
from vfiod.migration.planning.hostfacts import HostFacts
from vfiod.migration.planning.linkprior import link_prior
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import MigrationResult, SessionBase, SessionConfig
from vfiod.migration.session.dest import DestinationSession
from vfiod.migration.session.link import ThrottledLink
from vfiod.migration.session.source import SourceSession
from vfiod.migration.session.status import IterationProgress
from vfiod.migration.states import MigrationState
from vfiod.migration.transport import Connection, Listener, TlsConfig, TransportError, connect
from vfiod.migration.transport.control import TransportCode

log = logging.getLogger("vfiod.migrations")

PHASE = {MigrationState.SETUP: "setup", MigrationState.ACTIVE: "precopy",
         MigrationState.DEVICE: "stopcopy", MigrationState.CANCELLING: "stopcopy"}
OFFER_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0


class _Pending:
    """A running migration's handle for other threads: its cancel (kept if it comes
    before the session exists, while connecting) and the session's live status."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.session: SessionBase | None = None
        self.lock = threading.Lock()

    def cancel(self) -> None:
        with self.lock:
            self.cancelled.set()
            session = self.session
        if session is not None:
            session.cancel("cancelled by the operator (vfiod ctl cancel)")

    def attach(self, session: SessionBase) -> None:
        with self.lock:
            self.session = session
            if self.cancelled.is_set():
                session.cancel("cancelled by the operator (vfiod ctl cancel)")

    def live(self) -> dict[str, Any] | None:
        with self.lock:
            session = self.session
        return session.status().to_dict() if session is not None else None


#: Lifecycle steps taken when a migration ends: (new state, cause).
Moves = Sequence[tuple[LifecycleState, str]]


class MigrationService:
    def __init__(self, registry: Registry, guests: GuestManager, facts: Callable[[], HostFacts],
                 defaults: MigrationConfig, tls: TlsConfig | None = None) -> None:
        self.registry = registry
        self.lifecycle = registry.lifecycle
        self.guests = guests
        self.facts = facts
        self.defaults = defaults
        self.tls = tls
        self.listener: Listener | None = None
        self._threads: set[threading.Thread] = set()
        self._running: dict[MigrationRecord, _Pending] = {}
        self._lock = threading.Lock()      # _threads, _running (after the registry lock)
        self._closing = threading.Event()

    # -- threads ---------------------------------------------------------------------------
    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                target(*args)
            except Exception:  # noqa: BLE001 - logged; a migration thread must not vanish
                log.exception("%s crashed", name)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())
        t = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            self._threads.add(t)
        t.start()

    def _begin(self, guest: str, role: str, peer: str, *, migration_id: str = "",
               moves: Moves = (), **policy: Any) -> tuple[MigrationRecord, _Pending]:
        """Register a migration (``ValueError`` if one of the guest runs), take its first
        lifecycle steps and keep its cancel handle, in one write. The caller holds the
        registry lock and checked that the guest may take those steps."""
        with self.registry.lock:
            rec = self.registry.begin_migration(guest, role, peer, migration_id=migration_id,
                                                **policy)
            self._move(rec, moves)
            with self._lock:
                pending = self._running[rec] = _Pending()
            return rec, pending

    def _end(self, rec: MigrationRecord, result: str, moves: Moves = (), *,
             res: MigrationResult | None = None, error: str | None = None) -> None:
        """The migration's last lifecycle steps, its cancel handle dropped and its record
        finished (with the session's numbers, if it ran), in one write."""
        with self.registry.lock:
            try:
                self._move(rec, moves)
            finally:                # a refused step still ends the record; then it raises
                with self._lock:
                    self._running.pop(rec, None)
                if res is None:
                    self.registry.finish(rec, result, error=error)
                else:
                    sent = res.stream_bytes if rec.role == "source" else 0
                    self.registry.update(rec, bytes_sent=sent,
                                         bytes_received=res.stream_bytes - sent)
                    self.registry.finish(rec, result, error=res.reason or None,
                                         downtime_s=res.actual_downtime_s,
                                         predicted_s=res.predicted_downtime_s,
                                         verified=res.verified)

    def _move(self, rec: MigrationRecord, moves: Moves) -> None:
        for state, cause in moves:
            self.lifecycle.move(rec.guest, state, cause, migration_id=rec.id, peer=rec.peer)

    # -- outgoing --------------------------------------------------------------------------
    def start_outgoing(self, entry: GuestEntry, host: str, port: int, *,
                       downtime_limit_ms: float | None, timeout_s: float | None,
                       on_timeout: str | None) -> MigrationRecord:
        """Start migrating a running guest; ``ValueError`` if a migration of it runs."""
        d = self.defaults
        limit = downtime_limit_ms if downtime_limit_ms is not None else d.downtime_limit_ms
        timeout = timeout_s if timeout_s is not None else d.timeout_s
        policy = Policy(downtime_limit_s=limit / 1000, timeout_s=timeout,
                        on_timeout=on_timeout or d.on_timeout)
        peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        guest = self.guests.opened(entry.name)
        assert guest is not None, f"guest {entry.name} is {entry.state} but not open"
        rec, pending = self._begin(
            entry.name, "source", peer, downtime_limit_ms=limit, timeout_s=timeout,
            on_timeout=policy.on_timeout,
            moves=[(LifecycleState.MIGRATING_OUT, "migration ordered by the operator")])
        log.info("migration %s: guest %s to %s (limit %.0f ms)", rec.id, entry.name, peer, limit)
        self._spawn(f"vfiod-migrate-{entry.name}", self._source, rec, entry, guest, host, port,
                    policy, pending)
        return rec

    def _source(self, rec: MigrationRecord, entry: GuestEntry, guest: Guest, host: str,
                port: int, policy: Policy, pending: _Pending) -> None:
        try:
            self._source_session(rec, entry, guest, host, port, policy, pending)
        except Exception as e:  # noqa: BLE001 - the record must end, whatever broke
            log.exception("migration %s crashed", rec.id)
            reason = f"internal error: {type(e).__name__}: {e}"
            with self.registry.lock:
                # Whatever the session did to it is unknown: the guest is not ours to
                # migrate again until an operator looks.
                stuck = self.lifecycle.state(rec.guest) in OUTGOING
                self._end(rec, "failed", [(LifecycleState.FAILED, reason)] if stuck else (),
                          error=reason)

    def _source_session(self, rec: MigrationRecord, entry: GuestEntry, guest: Guest,
                        host: str, port: int, policy: Policy, pending: _Pending) -> None:
        try:
            conn = connect(host, port, tls=self.tls, timeout=CONNECT_TIMEOUT_S)
        except TransportError as e:
            self._not_started(rec, "failed", f"cannot reach the destination: {e}")
            return
        with conn:
            try:
                send_offer(conn, Offer(guest.name, rec.id, socket.gethostname()),
                           OFFER_TIMEOUT_S)
            except TransportError as e:
                reason = str(e.remote.get("message") or e)
                self._not_started(rec, "failed",
                                  f"the destination refused guest {guest.name}: {reason}")
                return
            if pending.cancelled.is_set():
                self._not_started(rec, "cancelled", "cancelled before the session started; "
                                  "nothing was changed")
                return
            bw = self.defaults.bandwidth_limit
            link: Any = ThrottledLink(conn, bw) if bw else conn
            session = SourceSession(
                guest, link, host=self.facts(), config=SessionConfig(policy=policy),
                memory_encryption=entry.config.memory_encryption, migration_id=rec.id,
                link_prior=_prior(host), progress=lambda p: self._progress(rec, p))
            res = self._run(rec, session, pending)
            if res.result == "completed":
                self._end(rec, "completed", [
                    (LifecycleState.MIGRATED_AWAY, "the destination resumed it"),
                    (LifecycleState.DEFINED, "released, to be re-opened: it may come back")],
                    res=res)
            else:
                self._end(rec, _result(res), [(LifecycleState.RUNNING, f"migration "
                                               f"{res.result}, rolled back: {res.reason}")],
                          res=res)
        if res.result == "completed":
            # The guest runs on the destination now; keep it ready to come back.
            self.guests.reopen(entry, "incoming")

    def _not_started(self, rec: MigrationRecord, result: str, reason: str) -> None:
        """An outgoing migration that ended before its session ran: nothing changed."""
        if result == "failed":
            log.error("migration %s of %s failed: %s", rec.id, rec.guest, reason)
        self._end(rec, result, [(LifecycleState.RUNNING, f"migration {result}: {reason}")],
                  error=reason)

    def _progress(self, rec: MigrationRecord, p: IterationProgress) -> None:
        with self.registry.lock:
            self.registry.update(
                rec, iteration=p.iteration,
                ram_sent_bytes=rec.progress.ram_sent_bytes + p.ram_sent_bytes,
                ram_remaining_bytes=p.dirty_ram_bytes, device_remaining_bytes=p.device_bytes,
                bandwidth_bps=p.bandwidth_bps, dirty_rate_bps=p.dirty_rate_bps,
                predicted_downtime_s=p.predicted_downtime_s, will_converge=p.will_converge,
                reason=p.reason, last_sync_s=p.sync_s, bytes_sent=p.total_sent_bytes)
            self.registry.observe_sync(p.sync_s)

    # -- incoming --------------------------------------------------------------------------
    def listen(self, host: str, port: int) -> tuple[str, int]:
        """Accept incoming migrations on ``host:port`` (0 = any port); returns the address."""
        self.listener = Listener(host, port, tls=self.tls)
        self._spawn("vfiod-migration-listener", self._accept_loop)
        return self.listener.address

    def _accept_loop(self) -> None:
        lst = self.listener
        while lst is not None and not self._closing.is_set():
            try:
                conn = lst.accept(timeout=0.5)   # bounded so shutdown is noticed
            except TransportError as e:
                if e.code is not TransportCode.ACCEPT_TIMEOUT and not self._closing.is_set():
                    log.warning("migration listener: %s", e)
                continue
            self._spawn("vfiod-incoming", self._destination, conn)

    def _destination(self, conn: Connection) -> None:
        with conn:
            try:
                offer = read_offer(conn, OFFER_TIMEOUT_S)
            except (OfferError, TransportError) as e:
                log.warning("incoming migration from %s refused: %s", conn.peer, e)
                _try(conn, str(e))
                return
            entry = self.registry.guest(offer.guest)
            try:
                rec, guest, pending = self._admit(entry, offer, conn.peer)
            except ValueError as e:
                log.warning("incoming migration from %s refused: %s", conn.peer, e)
                _try(conn, str(e))
                return
            assert entry is not None
            try:
                accept_offer(conn)
                session = DestinationSession(
                    guest, conn, host=self.facts(), config=SessionConfig(),
                    memory_encryption=entry.config.memory_encryption,
                    migration_id=rec.id)
                res = self._run(rec, session, pending)
            except Exception as e:  # noqa: BLE001 - the record must end, whatever broke
                log.exception("incoming migration %s crashed", rec.id)
                reason = f"internal error: {type(e).__name__}: {e}"
                self._end(rec, "failed", [(LifecycleState.DEFINED, f"discarded: {reason}")],
                          error=reason)
                self.guests.reopen(entry, "incoming")
                return
            if res.result == "completed":
                self._end(rec, "completed", [
                    (LifecycleState.LOADED, "received and loaded"),
                    (LifecycleState.RUNNING, "verified and resumed")], res=res)
            else:
                self._end(rec, _result(res), [(LifecycleState.DEFINED, f"discarded "
                                               f"({res.result}): {res.reason}")], res=res)
        if res.result == "completed":
            self.guests.started_running(entry)
        else:
            self.guests.reopen(entry, "incoming")

    def _admit(self, entry: GuestEntry | None, offer: Offer, peer: str
               ) -> tuple[MigrationRecord, Guest, _Pending]:
        if entry is None:
            raise ValueError(f"this host has no guest {offer.guest!r} configured")
        with self.registry.lock:
            guest = self.guests.opened(entry.name)
            if entry.state is not LifecycleState.INCOMING or guest is None:
                why = (entry.error if entry.state is LifecycleState.FAILED
                       else f"it is {entry.state} here")
                raise ValueError(f"guest {offer.guest} cannot be received: {why}")
            rec, pending = self._begin(entry.name, "destination", peer,
                                       migration_id=offer.migration_id[:64])
            return rec, guest, pending

    # -- both ------------------------------------------------------------------------------
    def _run(self, rec: MigrationRecord, session: SourceSession | DestinationSession,
             pending: _Pending) -> MigrationResult:
        def on_state(old: MigrationState, new: MigrationState) -> None:
            phase = PHASE.get(new)
            fields = {"phase": phase} if phase else {}
            with self.registry.lock:
                self.registry.update(rec, state=new.value, **fields)
                if rec.role == "source" and new is MigrationState.DEVICE:
                    self._move(rec, [(LifecycleState.SWITCHING_OVER,
                                      "paused for stop-and-copy")])
            log.info("migration %s (%s %s): %s -> %s", rec.id, rec.role, rec.guest,
                     old.name, new.name)

        session.add_state_handler(on_state)
        self.registry.update(rec, ram_total_bytes=session.guest.ram_bytes)
        pending.attach(session)
        res = session.run()
        log.info("migration %s (%s %s): %s%s", rec.id, rec.role, rec.guest, res.result,
                 f": {res.reason}" if res.reason else "")
        return res

    def live_status(self) -> dict[str, dict[str, Any]]:
        """Each running session's own status, by guest (read outside every lock: a
        session answers from its own)."""
        with self._lock:
            running = [(rec.guest, p) for rec, p in self._running.items()]
        out: dict[str, dict[str, Any]] = {}
        for guest, pending in running:
            try:
                live = pending.live()
            except Exception as e:  # noqa: BLE001 - status must answer even mid-teardown
                live = {"error": f"{type(e).__name__}: {e}"}
            if live is not None:
                out[guest] = live
        return out

    def cancel(self, entry: GuestEntry) -> MigrationRecord | None:
        """Ask the guest's running migration to cancel; None if none runs."""
        with self.registry.lock:
            rec = entry.migration
            if rec is None or not rec.active:
                return None
            with self._lock:
                pending = self._running.get(rec)
        if pending is None:
            return None
        pending.cancel()
        return rec

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Cancel every running migration and wait for the threads (bounded)."""
        self._closing.set()
        for entry in list(self.registry.guests.values()):
            self.cancel(entry)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("shutdown: %d migration thread(s) still running after %.0f s",
                          len(threads), timeout_s)
                self._abandon(timeout_s)
                break
            threads[0].join(left)
        if self.listener is not None:
            self.listener.close()

    def _abandon(self, timeout_s: float) -> None:
        """Guests whose outgoing migration outlived the shutdown deadline are failed (so
        they can be released): what their thread did to them is unknown."""
        with self.registry.lock:
            for name, state in self.lifecycle.states().items():
                if state in OUTGOING:
                    self.lifecycle.move(name, LifecycleState.FAILED, "its migration did not "
                                        f"end within the {timeout_s:.0f} s shutdown deadline")


def _result(res: MigrationResult) -> str:
    """The record's result for a session's (anything but completed or cancelled failed)."""
    return res.result if res.result in ("completed", "cancelled") else "failed"


def _prior(host: str) -> Any:
    try:
        return link_prior(host)
    except Exception as e:  # noqa: BLE001 - the prior is advisory; the default applies
        log.info("no link prior for %s: %s", host, e)
        return None


def _try(conn: Connection, reason: str) -> None:
    """Tell the source why (best effort: it may be gone already)."""
    try:
        refuse_offer(conn, reason)
    except (TransportError, OSError):
        pass
