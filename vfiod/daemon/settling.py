"""Settling an unsettled migration once its outcome is known: the journal first, then the
guest's devices, its lifecycle and its record (docs/architecture.md §1.7).

    source, runs there   outcome "resumed"; the session finishes (devices STOP, fds
                         released); migrated-away, then re-opened fresh as incoming
    source, runs here    outcome "rolled-back"; the session rolls the devices back to
                         RUNNING and resumes the guest (after a restart: the devices were
                         reset already); running
    destination, here    the session journals "resumed" and resumes; running
    destination, there   outcome "discarded"; the session resets what it loaded and zeroes
                         the RAM; re-opened fresh as incoming

A journal that cannot be written leaves the migration unsettled (``settle`` answers False
and the resolution asks again later).
"""

from __future__ import annotations

import logging

from vfiod.daemon.guests import GuestManager
from vfiod.daemon.journal import Journal, JournalError, MigrationOutcome
from vfiod.daemon.ledger import MigrationLedger
from vfiod.daemon.lifecycle import LifecycleState
from vfiod.daemon.resolution import Unsettled
from vfiod.daemon.switchover_records import MigrationJournal
from vfiod.errors import VfiodError
from vfiod.migration.session.common import MigrationResult
from vfiod.migration.states import GuestState

log = logging.getLogger("vfiod.resolution")

_S = LifecycleState


class MigrationSettler:
    def __init__(self, ledger: MigrationLedger, guests: GuestManager,
                 journal: Journal | None) -> None:
        self.ledger, self.guests, self.journal = ledger, guests, journal

    def _record(self, item: Unsettled, outcome: MigrationOutcome, why: str) -> None:
        if self.journal is not None:
            MigrationJournal(self.journal, self.ledger, item.rec).outcome(outcome, why)

    def settle(self, item: Unsettled, runs: bool, why: str) -> bool:
        try:
            if item.role == "source":
                self._source(item, runs, why)
            else:
                self._destination(item, runs, why)
        except (JournalError, VfiodError) as e:
            log.error("migration %s: cannot settle yet: %s", item.rec.id, e)
            return False
        log.warning("migration %s (%s of %s) settled: %s; %s", item.rec.id, item.role,
                    item.rec.guest, "runs on the peer" if (runs == (item.role == "source"))
                    else "runs here", why)
        return True

    def _source(self, item: Unsettled, runs_there: bool, why: str) -> None:
        rec, entry, s = item.rec, item.entry, item.session
        if runs_there:
            self._record(item, MigrationOutcome.RESUMED, why)
            res = s.settle(True, why) if s is not None else None
            self._end(item, "completed", [(_S.MIGRATED_AWAY, why)], res)
            self.guests.reopen(entry, "incoming", lambda: self.ledger.released_to_return(rec))
            return
        self._record(item, MigrationOutcome.ROLLED_BACK, why)
        if s is not None:
            res = s.settle(False, why)
        else:                        # restarted: the kernel reset the devices already
            res = None
            guest = self.guests.opened(rec.guest)
            if guest is not None:
                guest.set_run_state(GuestState.RUNNING)
        self._end(item, "failed", [(_S.RUNNING, f"resumed here: {why}")], res)
        self.guests.started_running(entry)

    def _destination(self, item: Unsettled, runs_here: bool, why: str) -> None:
        s = item.session
        if s is None:
            raise VfiodError(f"migration {item.rec.id}: no session left to settle")
        if runs_here:
            res = s.settle(True, why)          # journals "resumed" before it resumes
            if res.result != "completed":
                self.guests.reopen(item.entry, "incoming", lambda: self._end(
                    item, "failed", [(_S.DEFINED, f"discarded: {res.reason}")], res))
                return
            self._end(item, "completed", [], res)
            self.guests.started_running(item.entry)
            return
        self._record(item, MigrationOutcome.DISCARDED, why)
        res = s.settle(False, why)
        self.guests.reopen(item.entry, "incoming", lambda: self._end(
            item, "failed", [(_S.DEFINED, f"discarded: {why}")], res))

    def _end(self, item: Unsettled, result: str, moves: list[tuple[LifecycleState, str]],
             res: MigrationResult | None) -> None:
        self.ledger.end(item.rec, result, moves, res=res,
                        error=None if res is not None else item.last_answer or None)
