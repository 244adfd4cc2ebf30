"""Running migrations for the daemon: outgoing ones ordered over the control socket, and
incoming ones accepted on the migration listener (docs/architecture.md §1 steps 5-6, §6).

Each migration runs a ``vfiod.migration`` session on its own thread; this module wires
it to the daemon: the offer (``offer.py``) says which guest a connection is for, the
session's state handler and progress callback update the ``Registry`` (status, metrics),
the ``MigrationLedger`` (``ledger.py``) keeps each running migration's cancel and live
status and changes its record and its guest's lifecycle (``lifecycle.py``) together:

    source       running → migrating-out (ordered) → switching-over (stop-and-copy)
                 → migrated-away (the peer resumed it; then re-opened fresh: defined →
                 claimed → incoming, it may come back), or back to running (cancelled or
                 failed before the commit: rolled back), or → outcome-unknown (committed,
                 no answer: ``resolution.py`` settles it)
    destination  incoming → loaded → prepared (journaled before ACK prepared) → running
                 (journaled on COMMIT, before the devices resume); a failed receive is
                 discarded (→ defined) and re-opened fresh (claimed → incoming): a
                 destination must start from zeroed memory; no COMMIT: it stays prepared
                 until ``resolution.py`` settles it

With a journal (``journal.py``, the daemon always has one) every lifecycle step and the
switchover's records (``switchover_records.py``) are on disk before the step they allow,
an offer whose migration id the journal has seen is refused (a replay), and the outcome
queries of peers (docs/protocol.md §8.4) are answered on the migration port.

A guest to be re-opened (migrated away, or a discarded receive) is released (``defined``)
with the end of the record, and ``GuestManager.reopen`` then opens it fresh. Shutdown
cancels every running migration and waits for the threads, bounded (``shutdown``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from vfiod.daemon.backoff import AcceptBackoff
from vfiod.daemon.channel_routes import ChannelRoutes, dialer
from vfiod.daemon.config import MigrationConfig
from vfiod.daemon.guests import GuestManager
from vfiod.daemon.history_store import HistoryStore
from vfiod.daemon.journal import Journal, MigrationOutcome
from vfiod.daemon.ledger import SHUTDOWN_REASON, MigrationHandle
from vfiod.daemon.lifecycle import LifecycleState
from vfiod.daemon.link_priors import LinkPriors, PriorLease
from vfiod.daemon.migration_outcomes import OutcomeKeeping, host_of, record_result
from vfiod.daemon.offer import (
    Offer,
    OfferError,
    OfferLimits,
    PendingOffers,
    accept_offer,
    read_offer,
    refuse_quietly,
    send_offer,
)
from vfiod.daemon.peer_auth import connect_allowed, refused_peer
from vfiod.daemon.registry import GuestEntry, MigrationRecord, Registry
from vfiod.daemon.runstate.qemu_migration import qemu_half
from vfiod.migration.guest import Guest
from vfiod.migration.planning.hostfacts import HostFacts
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import MigrationResult, SessionConfig
from vfiod.migration.session.dest import DestinationSession
from vfiod.migration.session.link import ThrottledLink
from vfiod.migration.session.source import SourceSession
from vfiod.migration.session.status import IterationProgress, LiveProgress
from vfiod.migration.states import MigrationState
from vfiod.migration.transport import Listener, TlsConfig, TransportError
from vfiod.migration.transport.control import TransportCode
from vfiod.migration.transport.tcp import Accepted

log = logging.getLogger("vfiod.migrations")

PHASE = {MigrationState.SETUP: "setup", MigrationState.ACTIVE: "precopy",
         MigrationState.DEVICE: "stopcopy", MigrationState.CANCELLING: "stopcopy"}
OFFER_TIMEOUT_S = 30.0
#: listen() backlog of the migration port: a burst of connections waits in the kernel
LISTEN_BACKLOG = 64
#: how long the accept loop blocks: shutdown and offer deadlines are noticed this often
ACCEPT_POLL_S = 0.1


class MigrationService(OutcomeKeeping):
    def __init__(self, registry: Registry, guests: GuestManager, facts: Callable[[], HostFacts],
                 defaults: MigrationConfig, tls: TlsConfig | None = None,
                 offers: OfferLimits | None = None, journal: Journal | None = None,
                 histories: HistoryStore | None = None) -> None:
        super().__init__(registry, guests, tls, journal)
        self.histories = histories or HistoryStore()   # earlier switchovers, predictions'
        self.facts, self.defaults = facts, defaults
        self.listener: Listener | None = None
        self.offers = PendingOffers(offers or OfferLimits(deadline_s=OFFER_TIMEOUT_S))
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()      # _threads; taken after the registry lock
        self._closing = threading.Event()
        self.backoff = AcceptBackoff("migration port", self._closing.wait)
        self.channel_routes = ChannelRoutes()
        self.link_priors = LinkPriors()    # one route lookup per destination, shared

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
        with self._lock:   # started under it: the stop joins all it finds; unstarted raises
            self._threads.add(t)
            t.start()

    # -- outgoing --------------------------------------------------------------------------
    def start_outgoing(self, entry: GuestEntry, host: str, port: int, *,
                       downtime_limit_ms: float | None, timeout_s: float | None,
                       on_timeout: str | None, channels: int | None = None) -> MigrationRecord:
        """Start migrating a running guest; ``ValueError`` if a migration of it runs."""
        d = self.defaults
        limit = downtime_limit_ms if downtime_limit_ms is not None else d.downtime_limit_ms
        timeout = timeout_s if timeout_s is not None else d.timeout_s
        policy = Policy(downtime_limit_s=limit / 1000, timeout_s=timeout,
                        on_timeout=on_timeout or d.on_timeout)
        config = self._session_config(policy, channels)
        peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        guest = self.guests.opened(entry.name)
        assert guest is not None, f"guest {entry.name} is {entry.state} but not open"
        rec, pending = self.ledger.begin(
            entry.name, "source", peer, downtime_limit_ms=limit, timeout_s=timeout,
            on_timeout=policy.on_timeout,
            moves=[(LifecycleState.MIGRATING_OUT, "migration ordered by the operator")])
        log.info("migration %s: guest %s to %s (limit %.0f ms)", rec.id, entry.name, peer, limit)
        self._spawn(f"vfiod-migrate-{entry.name}", self._source, rec, entry, guest, host, port,
                    config, pending)
        return rec

    def _source(self, rec: MigrationRecord, entry: GuestEntry, guest: Guest, host: str,
                port: int, config: SessionConfig, pending: MigrationHandle) -> None:
        # the route lookup runs as the session starts; the predictor takes its answer later
        prior = self.link_priors.lease(host)
        try:
            self._source_session(rec, entry, guest, host, port, config, pending, prior)
        except Exception as e:  # noqa: BLE001 - the record must end, whatever broke
            log.exception("migration %s crashed", rec.id)
            self.ledger.crashed(rec, f"internal error: {type(e).__name__}: {e}")
        finally:
            prior.close()
            self.histories.save()      # after the session: never inside a downtime

    def _source_session(self, rec: MigrationRecord, entry: GuestEntry, guest: Guest,
                        host: str, port: int, config: SessionConfig, pending: MigrationHandle,
                        prior: PriorLease) -> None:
        try:
            conn = connect_allowed(host, port, entry.config, self.defaults, self.tls)
        except TransportError as e:
            self._not_started(rec, "failed", f"cannot reach the destination: {e}")
            return
        with conn:
            try:
                send_offer(conn, Offer(guest.name, rec.id, socket.gethostname(),
                                       reply_port=self.reply_port), OFFER_TIMEOUT_S)
            except TransportError as e:
                reason = str(e.remote.get("message") or e)
                self._not_started(rec, "failed",
                                  f"the destination refused guest {guest.name}: {reason}")
                return
            if pending.cancelled.is_set():
                self._not_started(rec, "cancelled", f"{pending.reason}, before the session "
                                  "started; nothing was changed")
                return
            bw = self.defaults.bandwidth_limit
            link: Any = ThrottledLink(conn, bw) if bw else conn
            session = SourceSession(
                guest, link, host=self.facts(), config=config,
                memory_encryption=entry.config.memory_encryption, migration_id=rec.id,
                link_prior=prior.current, progress=lambda p: self._progress(rec, p),
                live=lambda lp: self._live(rec, lp), journal=self._journal_of(rec),
                history=self.histories.of(guest.name, guest.device_infos()),
                vmm=qemu_half(entry.config.qemu, peer_host=host))
            session.channel_dialer = dialer(host, port, entry.config, self.defaults, self.tls, rec.id)
            res = self._run(rec, session, pending)
            if res.result == "completed":
                self._outcome(rec, MigrationOutcome.RESUMED, "the destination resumed it")
                self.ledger.end(rec, "completed", [
                    (LifecycleState.MIGRATED_AWAY, "the destination resumed it")], res=res)
            elif res.result == "unsettled":
                self._unsettled(rec, entry, "source", host, port, session, res,
                                LifecycleState.OUTCOME_UNKNOWN)
                return
            else:
                self._outcome(rec, MigrationOutcome.ROLLED_BACK, res.reason)
                back = f"migration {res.result}, rolled back: {res.reason}"
                self.ledger.end(rec, record_result(res), [(LifecycleState.RUNNING, back)], res=res)
        if res.result == "completed":
            # The guest runs on the destination now; keep it ready to come back (its fds
            # closed before it reads "defined": its VMM may take its RAM back at once).
            self.guests.reopen(entry, "incoming", lambda: self.ledger.released_to_return(rec))

    def _session_config(self, policy: Policy | None = None, channels: int | None = None
                        ) -> SessionConfig:   # channels: RAM channels as a source, if any
        return SessionConfig(policy or Policy(), self.defaults.ack_timeout_s,
                             channels=channels or self.defaults.channels)

    def _not_started(self, rec: MigrationRecord, result: str, reason: str) -> None:
        """An outgoing migration that ended before its session ran: nothing changed."""
        if result == "failed":
            log.error("migration %s of %s failed: %s", rec.id, rec.guest, reason)
        self.ledger.end(rec, result, [(LifecycleState.RUNNING, f"migration {result}: {reason}")],
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

    def _live(self, rec: MigrationRecord, lp: LiveProgress) -> None:
        """During a pass: its start, then what moved since (at most every 100 ms)."""
        with self.registry.lock:
            self.registry.update(
                rec, iteration=lp.iteration, bytes_sent=lp.bytes_sent,
                ram_remaining_bytes=lp.ram_remaining_bytes,
                device_remaining_bytes=lp.device_remaining_bytes,
                throughput_bps=lp.throughput_bps, eta_s=lp.eta_s)

    # -- incoming --------------------------------------------------------------------------
    def listen(self, host: str, port: int) -> tuple[str, int]:
        """Accept incoming migrations on ``host:port`` (0 = any port); returns the address."""
        self.listener = Listener(host, port, tls=self.tls, backlog=LISTEN_BACKLOG)
        self.reply_port = self.listener.address[1]
        self._spawn("vfiod-migration-listener", self._accept_loop)
        return self.listener.address

    def _accept_loop(self) -> None:
        lst = self.listener
        while lst is not None and not self._closing.is_set():
            self.offers.expire()
            try:
                conn = lst.accept_raw(timeout=ACCEPT_POLL_S)
            except TransportError as e:
                if self.backoff.failed(e.errno):
                    continue
                if e.code is not TransportCode.ACCEPT_TIMEOUT and not self._closing.is_set():
                    log.warning("migration listener: %s", e)
                continue
            self.backoff.succeeded()
            # The handshake and the offer run on the connection's own thread; the slots
            # bound how many such threads exist (offer.py).
            if self.offers.admit(conn):
                self._spawn("vfiod-incoming", self._destination, conn)

    def _destination(self, accepted: Accepted) -> None:
        try:
            conn = accepted.handshake(self.offers.limits.handshake_s)
            conn.set_io_timeout(self.defaults.io_timeout_s)
        except TransportError as e:
            self.offers.done(accepted)
            log.warning("incoming migration from %s refused: %s", accepted.peer, e)
            return
        with conn:
            try:
                offer = read_offer(conn, self.offers.limits.deadline_s)
            except (OfferError, TransportError) as e:
                self.offers.done(accepted)
                log.warning("incoming migration from %s refused: %s", conn.peer, e)
                refuse_quietly(conn, str(e))
                return
            if not self.offers.done(accepted):
                return                     # closed at its deadline, or to make room
            entry = self.registry.guest(offer.guest)
            if refused_peer(conn, entry, self.defaults, offer.kind):
                return
            if offer.kind in ("query", "channel"):     # a channel: held until its end
                (self._answer if offer.kind == "query" else self.channel_routes.deliver)(
                    conn, offer)
                return
            try:
                rec, guest, pending = self._admit(entry, offer, conn.peer)
            except ValueError as e:
                log.warning("incoming migration from %s refused: %s", conn.peer, e)
                refuse_quietly(conn, str(e))
                return
            assert entry is not None
            try:
                accept_offer(conn)
                session = DestinationSession(
                    guest, conn, host=self.facts(), config=self._session_config(),
                    memory_encryption=entry.config.memory_encryption,
                    migration_id=rec.id, journal=self._journal_of(rec),
                    vmm=qemu_half(entry.config.qemu))
                with self.channel_routes.accepting(rec.id) as session.channel_acceptor:
                    res = self._run(rec, session, pending)
            except Exception as e:  # noqa: BLE001 - the record must end, whatever broke
                log.exception("incoming migration %s crashed", rec.id)
                reason = f"internal error: {type(e).__name__}: {e}"
                self.guests.reopen(entry, "incoming", lambda: self.ledger.end(
                    rec, "failed", [(LifecycleState.DEFINED, f"discarded: {reason}")],
                    error=reason))
                return
            if res.result == "completed":     # prepared → running was journaled on COMMIT
                self.ledger.end(rec, "completed", [], res=res)
            elif res.result == "unsettled":
                self._unsettled(rec, entry, "destination", host_of(conn.peer),
                                offer.reply_port, session, res, None)
                return
            else:
                self._outcome(rec, MigrationOutcome.DISCARDED, res.reason)
        if res.result == "completed":
            self.guests.started_running(entry)
        else:
            # its fds closed first: a VMM that reads "defined" finds none of them held
            gone = f"discarded ({res.result}): {res.reason}"
            self.guests.reopen(entry, "incoming", lambda: self.ledger.end(
                rec, record_result(res), [(LifecycleState.DEFINED, gone)], res=res))

    def _admit(self, entry: GuestEntry | None, offer: Offer, peer: str
               ) -> tuple[MigrationRecord, Guest, MigrationHandle]:
        if entry is None:
            raise ValueError(f"this host has no guest {offer.guest!r} configured")
        if not offer.migration_id:
            raise ValueError("the offer names no migration id")
        if self.journal is not None and self.journal.seen(offer.migration_id):
            raise ValueError(f"migration id {offer.migration_id!r} was seen on this host "
                             "before: a replayed or reused offer is refused")
        with self.registry.lock:
            guest = self.guests.opened(entry.name)
            if entry.state is not LifecycleState.INCOMING or guest is None:
                why = (entry.error if entry.state is LifecycleState.FAILED
                       else f"it is {entry.state} here")
                raise ValueError(f"guest {offer.guest} cannot be received: {why}")
            rec, pending = self.ledger.begin(entry.name, "destination", peer,
                                       migration_id=offer.migration_id[:64])
            return rec, guest, pending

    # -- both ------------------------------------------------------------------------------
    def _run(self, rec: MigrationRecord, session: SourceSession | DestinationSession,
             pending: MigrationHandle) -> MigrationResult:
        def on_state(old: MigrationState, new: MigrationState) -> None:
            phase = PHASE.get(new)
            fields = {"phase": phase} if phase else {}
            with self.registry.lock:
                self.registry.update(rec, state=new.value, **fields)
                if rec.role == "source" and new is MigrationState.DEVICE:
                    self.ledger.move(rec, [(LifecycleState.SWITCHING_OVER,
                                      "paused for stop-and-copy")])
            log.info("migration %s (%s %s): %s -> %s", rec.id, rec.role, rec.guest,
                     old.name, new.name)

        session.add_state_handler(on_state)
        self.registry.update(rec, ram_total_bytes=session.guest.ram_bytes)
        pending.attach(session)
        res = session.run()
        log.info("migration %s (%s %s): %s%s", rec.id, rec.role, rec.guest, res.result,
                 f": {res.reason}" if res.reason else "")
        for warning in res.warnings:
            log.warning("migration %s (%s %s): %s", rec.id, rec.role, rec.guest, warning)
        with self.registry.lock:
            rec.warnings = list(res.warnings)
        return res

    def shutdown(self, timeout_s: float) -> None:
        """Refuse new migrations, cancel every running one that has not committed (one
        past its commit refuses the cancel and runs on: it is finished, never rolled
        back) and wait for the threads, at most ``timeout_s`` (daemon/stopping.py). A
        migration still running then keeps its guest (``ledger.holds``): the caller leaves
        that guest's fds open; an outgoing one's guest is marked failed."""
        self._closing.set()
        self.ledger.close(SHUTDOWN_REASON, by="shutdown")
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                running = self.ledger.running()
                log.error("shutdown: %d thread(s) still running after the %g s stop budget"
                          "%s", len(threads), timeout_s,
                          "".join(f"; migration {r.id} ({r.role} {r.guest}, {r.peer})"
                                  for r in running))
                self.ledger.abandon(f"its migration did not end within the {timeout_s:g} "
                                    "s shutdown deadline")
                break
            # A connection still waiting to offer holds no guest: close it (again each
            # turn, until the accept loop has seen _closing and admits no more).
            self.offers.abort_all()
            threads[0].join(min(left, ACCEPT_POLL_S))
        if self.listener is not None:
            self.listener.close()
