"""The daemon's ``SwitchoverJournal``: what one migration writes to the journal at the
confirmed switchover's steps, with the guest's lifecycle steps that go with them
(docs/architecture.md §1.7, §1.8; docs/protocol.md §8.4).

    source       committing   outcome "committed"                       (then COMMIT)
    destination  prepared     lifecycle incoming → loaded → prepared, outcome "prepared"
                 resuming     outcome "resumed", lifecycle prepared → running
                 discarding   outcome "discarded"                      (then ERROR)

Each returns once its records are fsynced (the lifecycle journals its own transitions
through ``GuestLifecycle.record``); a ``JournalError`` stops the step. The steps inside
the downtime write ``SWITCHOVER_RECORDS`` records, one fsync each: the source's commit
(1), the destination's prepared (3) and resume (2).
"""

from __future__ import annotations

import time

from vfiod.daemon.journal import Journal, MigrationOutcome, OutcomeRecord
from vfiod.daemon.ledger import MigrationLedger
from vfiod.daemon.lifecycle import LifecycleState
from vfiod.daemon.registry import MigrationRecord

SWITCHOVER_RECORDS = 6


class MigrationJournal:
    """The records of migration ``rec``."""

    def __init__(self, journal: Journal, ledger: MigrationLedger,
                 rec: MigrationRecord) -> None:
        self.journal, self.ledger, self.rec = journal, ledger, rec

    def outcome(self, outcome: MigrationOutcome, detail: str = "") -> None:
        r = self.rec
        self.journal.append_outcome(OutcomeRecord(r.id, r.guest, r.role, outcome, r.peer,
                                                  time.time(), detail))

    def committing(self, migration_id: str) -> None:
        self.outcome(MigrationOutcome.COMMITTED, "the source decided to commit")

    def prepared(self, migration_id: str) -> None:
        self.ledger.move(self.rec, [
            (LifecycleState.LOADED, "received and loaded"),
            (LifecycleState.PREPARED, "verified; waiting for the source's commit")],
            must_record=True)
        self.outcome(MigrationOutcome.PREPARED)

    def resuming(self, migration_id: str) -> None:
        self.outcome(MigrationOutcome.RESUMED, "committed by the source")
        self.ledger.move(self.rec, [(LifecycleState.RUNNING, "committed: resumed here")],
                         must_record=True)

    def discarding(self, migration_id: str) -> None:
        self.outcome(MigrationOutcome.DISCARDED, "could not resume after the commit")

    def switchover_write_s(self) -> float:
        return SWITCHOVER_RECORDS * self.journal.write_s()
