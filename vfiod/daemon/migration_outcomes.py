"""What ``MigrationService`` keeps about outcomes: the journal records of its migrations,
the unsettled ones (``resolution.py``) and the answers to peers' outcome queries
(docs/architecture.md §1.7, §1.8; docs/protocol.md §8.4).
"""

from __future__ import annotations

import logging

from vfiod.daemon.guests import GuestManager
from vfiod.daemon.journal import Journal, JournalError, MigrationOutcome
from vfiod.daemon.ledger import MigrationLedger
from vfiod.daemon.lifecycle import LifecycleState
from vfiod.daemon.offer import Offer
from vfiod.daemon.outcomes import OutcomeAnswer, ask_outcome, send_answer
from vfiod.daemon.query_answer import answer_query
from vfiod.daemon.registry import GuestEntry, MigrationRecord, Registry
from vfiod.daemon.resolution import QUERY_TIMEOUT_S, Resolution, Unsettled
from vfiod.daemon.settling import MigrationSettler
from vfiod.daemon.switchover_records import MigrationJournal
from vfiod.migration.session.common import MigrationResult
from vfiod.migration.session.dest import DestinationSession
from vfiod.migration.session.source import SourceSession
from vfiod.migration.session.switchover import UNJOURNALED, SwitchoverJournal
from vfiod.migration.transport import Connection, TlsConfig, TransportError

log = logging.getLogger("vfiod.migrations")


def record_result(res: MigrationResult) -> str:
    """The record's result for a session's (anything but completed or cancelled failed)."""
    return res.result if res.result in ("completed", "cancelled") else "failed"


def host_of(peer: str) -> str:
    """The host of a "host:port" or "[v6]:port" peer name."""
    return peer.rsplit(":", 1)[0].strip("[]")


class OutcomeKeeping:
    def __init__(self, registry: Registry, guests: GuestManager, tls: TlsConfig | None,
                 journal: Journal | None) -> None:
        self.registry = registry
        self.ledger = MigrationLedger(registry)
        self.guests = guests
        self.tls = tls
        self.journal = journal
        self.resolution = Resolution(MigrationSettler(self.ledger, guests, journal),
                                     self._ask)
        #: this daemon's migration port, offered to destinations to ask us (0: none)
        self.reply_port = 0

    def _journal_of(self, rec: MigrationRecord) -> SwitchoverJournal:
        return (MigrationJournal(self.journal, self.ledger, rec) if self.journal is not None
                else UNJOURNALED)

    def _outcome(self, rec: MigrationRecord, outcome: MigrationOutcome, why: str) -> None:
        """An outcome record that no step waits for (best effort: a full disk is logged;
        a query then finds the lifecycle's records or nothing)."""
        if self.journal is None:
            return
        try:
            MigrationJournal(self.journal, self.ledger, rec).outcome(outcome, why)
        except JournalError as e:
            log.error("migration %s: %s", rec.id, e)

    def _unsettled(self, rec: MigrationRecord, entry: GuestEntry, role: str, host: str,
                   port: int, session: SourceSession | DestinationSession,
                   res: MigrationResult, to: LifecycleState | None) -> None:
        """Keep the migration (and its session, devices and paused guest) until
        ``resolution`` settles it."""
        with self.registry.lock:
            if to is not None:
                self.ledger.move(rec, [(to, res.reason)])
            self.registry.update(rec, state="unsettled")
            self.ledger.park(rec)
        log.error("migration %s (%s of %s): %s; the guest stays paused until the peer "
                  "answers (vfiod ctl status shows it; vfiod ctl resolve if the peer is gone)",
                  rec.id, role, rec.guest, res.reason)
        self.resolution.add(Unsettled(rec, entry, role, host, port, session))

    def _ask(self, item: Unsettled) -> OutcomeAnswer:
        return ask_outcome(item.peer_host, item.peer_port, item.query(), tls=self.tls,
                           timeout_s=QUERY_TIMEOUT_S)

    def _answer(self, conn: Connection, query: Offer) -> None:
        try:
            answer = answer_query(query, self.registry, self.resolution, self.journal)
            send_answer(conn, answer)
        except (TransportError, OSError) as e:
            log.info("outcome query from %s: %s", conn.peer, e)
            return
        log.info("outcome query from %s about migration %s of %s: answered %s", conn.peer,
                 query.migration_id, query.guest, answer.outcome)
