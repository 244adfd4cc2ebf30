"""What a restart makes of each guest, row by row of ``recovery.py``'s table
(docs/architecture.md §1.8), and the answers a journal gives to a peer's outcome query
(docs/protocol.md §8.4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfiod.daemon.config import GuestConfig, RamConfig
from vfiod.daemon.journal import Journal, MigrationOutcome, OutcomeRecord
from vfiod.daemon.lifecycle import LifecycleState, LifecycleTransition
from vfiod.daemon.offer import Offer
from vfiod.daemon.query_answer import answer_query
from vfiod.daemon.recovery import RECOVERY, outcome_record, plan_all, plan_recovery
from vfiod.daemon.registry import Registry
from vfiod.daemon.resolution import Resolution

S, OC = LifecycleState, MigrationOutcome
FILE = GuestConfig("g1", (RamConfig("ram", 0, 1 << 20, "/dev/shm/g1"),), start="incoming")
MEMFD = GuestConfig("g1", (RamConfig("ram", 0, 1 << 20),), start="running")


def last(frm: LifecycleState, to: LifecycleState, mid: str = "m1") -> LifecycleTransition:
    return LifecycleTransition("g1", frm, to, "test", mid, "hostb:4444", 1_700_000_000.0)


def outcome(o: MigrationOutcome, role: str) -> OutcomeRecord:
    return OutcomeRecord("m1", "g1", role, o, "hostb:4444", 1_700_000_000.0)


ROWS = [
    # last transition, outcome of its migration -> starts as, label, words in the note
    (last(S.CLAIMED, S.RUNNING, ""), None, "running", "running-here", "memory kept"),
    (last(S.PREPARED, S.RUNNING), outcome(OC.RESUMED, "destination"), "running",
     "resumed-here", "migrated in from hostb:4444"),
    (last(S.RUNNING, S.MIGRATING_OUT), None, "running", "rolled-back", "no commit record"),
    (last(S.MIGRATING_OUT, S.SWITCHING_OVER), None, "running", "rolled-back",
     "the kernel's reset rolled it back"),
    (last(S.MIGRATING_OUT, S.SWITCHING_OVER), outcome(OC.COMMITTED, "source"),
     "outcome-unknown", "unknown", "outcome unknown, paused, asking hostb:4444"),
    (last(S.SWITCHING_OVER, S.OUTCOME_UNKNOWN), outcome(OC.COMMITTED, "source"),
     "outcome-unknown", "unknown", "devices reset"),
    (last(S.SWITCHING_OVER, S.OUTCOME_UNKNOWN), outcome(OC.RESUMED, "source"), "incoming",
     "migrated-away", "migrated to hostb:4444"),
    (last(S.SWITCHING_OVER, S.MIGRATED_AWAY), outcome(OC.RESUMED, "source"), "incoming",
     "migrated-away", "not started here"),
    (last(S.LOADED, S.PREPARED), outcome(OC.PREPARED, "destination"), "incoming", "lost",
     "the source keeps the guest"),
    (last(S.LOADED, S.PREPARED), outcome(OC.RESUMED, "destination"), "running",
     "resumed-here", "committed migration m1"),
    (last(S.INCOMING, S.LOADED), None, "incoming", "discarded", "discarded"),
]


@pytest.mark.parametrize("rec,oc,start,label,words", ROWS)
def test_each_row_of_the_table(rec: LifecycleTransition, oc: OutcomeRecord | None,
                               start: str, label: str, words: str) -> None:
    p = plan_recovery(FILE, rec, oc)
    assert (p.start, p.outcome) == (start, label), p
    assert words in p.note, p.note
    assert label in RECOVERY


def test_nothing_journaled_starts_as_configured() -> None:
    assert plan_recovery(MEMFD, None, None).start == "running"
    assert plan_recovery(FILE, None, None).start == "incoming"
    assert plan_recovery(FILE, last(S.DEFINED, S.FAILED, ""), None).outcome == ""


def test_memory_fate_is_said_never_silent() -> None:
    p = plan_recovery(MEMFD, last(S.CLAIMED, S.RUNNING, ""), None)
    assert "memory lost" in p.note and "memfd" in p.note


def test_a_destination_restarted_while_prepared_writes_lost_first() -> None:
    p = plan_recovery(FILE, last(S.LOADED, S.PREPARED), outcome(OC.PREPARED, "destination"))
    rec = outcome_record(p)
    assert rec is not None and (rec.outcome, rec.role, rec.migration_id) == (
        OC.LOST, "destination", "m1")
    rolled = outcome_record(plan_recovery(FILE, last(S.RUNNING, S.MIGRATING_OUT), None))
    assert rolled is not None and (rolled.outcome, rolled.role) == (OC.ROLLED_BACK, "source")


class _NoSettle:
    def settle(self, item: object, runs: bool, why: str) -> bool:
        raise AssertionError("nothing is unsettled here")


@pytest.mark.parametrize("recorded,role,answer", [
    (OC.COMMITTED, "source", "committed"), (OC.RESUMED, "source", "committed"),
    (OC.ROLLED_BACK, "source", "rolled-back"), (OC.RESUMED, "destination", "resumed"),
    (OC.DISCARDED, "destination", "discarded"), (OC.LOST, "destination", "lost"),
    (OC.PREPARED, "destination", "lost"), (None, "", "unknown")])
def test_a_query_is_answered_from_the_journal(tmp_path: Path, recorded: MigrationOutcome | None,
                                              role: str, answer: str) -> None:
    journal = Journal.open(tmp_path)
    if recorded is not None:
        journal.append_outcome(outcome(recorded, role))
    reg = Registry()
    reg.add_guest(FILE)
    got = answer_query(Offer("g1", "m1", kind="query", role="source"), reg,
                       Resolution(_NoSettle(), lambda item: None), journal)  # type: ignore[arg-type, return-value]
    assert got.outcome == answer
    journal.close()


@pytest.mark.parametrize("after", [S.DEFINED, S.CLAIMED])
def test_a_source_killed_while_re_opening_a_guest_that_left_does_not_run_it(
        tmp_path: Path, after: LifecycleState) -> None:
    """Found by the fault matrix under load: the source completed, journaled "released,
    to be re-opened" (migrated-away -> defined) and died before the re-open as incoming
    was journaled. A guest configured ``start = "running"`` then started running on the
    source as well: two owners."""
    journal = Journal.open(tmp_path)
    journal.append_outcome(outcome(OC.RESUMED, "source"))
    journal.append_transition(last(S.SWITCHING_OVER, S.MIGRATED_AWAY))
    journal.append_transition(last(S.MIGRATED_AWAY, S.DEFINED))
    if after is S.CLAIMED:
        journal.append_transition(last(S.DEFINED, S.CLAIMED, ""))
    journal.close()
    with Journal.open(tmp_path) as restarted:           # what the restart reads
        plan = plan_all((MEMFD,), restarted)["g1"]
    assert (plan.start, plan.outcome) == ("incoming", "migrated-away"), plan
    assert "migrated to hostb:4444" in plan.note
