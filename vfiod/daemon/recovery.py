"""What a restarted daemon does with each guest, from its journal (docs/architecture.md
§1.8, §1.7).

The process died, so every device it held was reset by the kernel and every guest starts
``defined``. The journal's last transition of the guest and the latest outcome of the
migration it names decide the rest:

    last state / outcome                       starts as        reported (``RECOVERY``)
    running (no migration)                     running          running-here
    running, migrated in (outcome resumed)     running          resumed-here
    migrating-out | switching-over, no commit  running          rolled-back (the kernel's
                                                                reset rolled it back)
    switching-over | outcome-unknown,          outcome-unknown  unknown (asks the peer:
      committed                                                 ``resolution.py``)
    ... the peer confirmed it resumed          incoming         migrated-away
    migrated-away                              incoming         migrated-away
    incoming | loaded                          incoming         discarded
    prepared                                   incoming         lost: its device state
                                                                was reset; the journal now
                                                                answers "lost"
    defined | claimed after it left            incoming         migrated-away (killed
                                                                while being re-opened)
    nothing, defined, failed, claimed          as configured    (not counted)

Memory is kept across the restart where every RAM region is a file (``[[guest.ram]]
path``, as a VMM's would be) and lost otherwise (a memfd dies with the process); the
note says which, never silently.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from vfiod.daemon.config import GuestConfig
from vfiod.daemon.guests import GuestManager
from vfiod.daemon.journal import Journal, JournalError, MigrationOutcome, OutcomeRecord
from vfiod.daemon.lifecycle import LifecycleState, LifecycleTransition
from vfiod.daemon.migrations import MigrationService
from vfiod.daemon.registry import Registry
from vfiod.daemon.resolution import Unsettled

log = logging.getLogger("vfiod.recovery")

#: the ``outcome`` label of ``vfiod_recoveries_total``
RECOVERY = ("running-here", "resumed-here", "rolled-back", "unknown", "migrated-away",
            "discarded", "lost")

_S = LifecycleState
_O = MigrationOutcome


@dataclass(frozen=True)
class RecoveryPlan:
    guest: str
    start: str                    # "running" | "incoming" | "outcome-unknown"
    outcome: str = ""             # a RECOVERY label; "" = nothing to recover
    note: str = ""                # for the log and ``vfiod ctl status``
    migration_id: str = ""
    peer: str = ""
    #: a destination-side outcome to write now (discarded, lost) before anything else
    write: MigrationOutcome | None = None


def memory_fate(gc: GuestConfig) -> str:
    if gc.ram and all(r.path is not None for r in gc.ram):
        return "memory kept (file-backed RAM)"
    return "memory lost (its RAM was a memfd of the dead process)"


def plan_recovery(gc: GuestConfig, last: LifecycleTransition | None,
                  outcome: OutcomeRecord | None) -> RecoveryPlan:
    """What guest ``gc`` starts as after a restart (module docstring)."""
    name = gc.name
    if last is None or last.to_state in (_S.DEFINED, _S.FAILED, _S.CLAIMED):
        return RecoveryPlan(name, gc.start)
    mid, peer, st = last.migration_id, last.peer, last.to_state
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.at))
    oc = outcome.outcome if outcome is not None else None
    mem = memory_fate(gc)
    plan = _plan(name, st, oc, mid, peer, at, mem)
    if plan is not None:
        return plan
    return RecoveryPlan(name, "running", "running-here",
                        f"restarted while it ran here: devices reset, {mem}", mid, peer)


def _plan(name: str, st: LifecycleState, oc: MigrationOutcome | None, mid: str, peer: str,
          at: str, mem: str) -> RecoveryPlan | None:
    def plan(start: str, label: str, note: str,
             write: MigrationOutcome | None = None) -> RecoveryPlan:
        return RecoveryPlan(name, start, label, note, mid, peer, write)

    if st is _S.RUNNING and oc is _O.RESUMED:
        return plan("running", "resumed-here", f"migrated in from {peer} (migration {mid}) "
                    f"and ran here: restarted with its devices reset, {mem}")
    if st is _S.MIGRATED_AWAY or (st in (_S.SWITCHING_OVER, _S.OUTCOME_UNKNOWN)
                                  and oc is _O.RESUMED):
        return plan("incoming", "migrated-away", f"migrated to {peer} at {at} "
                    f"(migration {mid}); not started here")
    if st in (_S.SWITCHING_OVER, _S.OUTCOME_UNKNOWN) and oc is _O.COMMITTED:
        return plan("outcome-unknown", "unknown", f"restarted after committing migration "
                    f"{mid} to {peer}: outcome unknown, paused, asking {peer}; devices "
                    f"reset, {mem}")
    if st in (_S.MIGRATING_OUT, _S.SWITCHING_OVER, _S.OUTCOME_UNKNOWN):
        return plan("running", "rolled-back", f"outgoing migration {mid} to {peer} had no "
                    "commit record: the kernel's reset rolled it back when the process "
                    f"died; runs here with its devices reset, {mem}", _O.ROLLED_BACK)
    if st is _S.PREPARED and oc is _O.RESUMED:
        return plan("running", "resumed-here", f"committed migration {mid} from {peer}: "
                    f"runs here, restarted with its devices reset, {mem}")
    if st is _S.PREPARED:
        return plan("incoming", "lost", f"restarted while prepared for migration {mid} "
                    f"from {peer}: the device state it had loaded was reset, so it is lost "
                    "here; the source keeps the guest", _O.LOST)
    if st in (_S.INCOMING, _S.LOADED):
        return plan("incoming", "discarded" if mid else "",
                    f"restarted while receiving migration {mid}: discarded" if mid else "",
                    _O.DISCARDED if mid and oc is None else None)
    return None


def plan_all(guests: tuple[GuestConfig, ...], journal: Journal) -> dict[str, RecoveryPlan]:
    out = {}
    for gc in guests:
        last = journal.last(gc.name)
        mid = last.migration_id if last is not None else ""
        plan = plan_recovery(gc, last, journal.outcome(mid) if mid else None)
        away = _last_departure(journal, gc.name)
        reopening = last is not None and last.to_state in (_S.DEFINED, _S.CLAIMED)
        if away is not None and not plan.outcome and (plan.start == "incoming"
                                                      or reopening):
            # re-opened as incoming after it left, or killed while being re-opened
            # (released, not yet incoming): it runs elsewhere, never here
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(away.at))
            plan = RecoveryPlan(gc.name, "incoming", "migrated-away",
                                f"migrated to {away.peer} at {when} (migration "
                                f"{away.migration_id}); not started here",
                                away.migration_id, away.peer)
        out[gc.name] = plan
    return out


def _last_departure(journal: Journal, guest: str) -> OutcomeRecord | None:
    """The guest's latest outcome, if it is a source's "the peer resumed it"."""
    mine = [o for o in journal.state.outcomes.values() if o.guest == guest]
    last = max(mine, key=lambda o: o.at, default=None)
    if last is not None and last.role == "source" and last.outcome is _O.RESUMED:
        return last
    return None


def recover(configs: tuple[GuestConfig, ...], journal: Journal, registry: Registry,
            guests: GuestManager, migrations: MigrationService) -> None:
    """Open every guest as its plan says, write what the plans must write first, report
    each recovery (log, ``vfiod ctl status`` notes, ``vfiod_recoveries_total``) and hand
    committed migrations with no outcome to the resolution."""
    plans = plan_all(configs, journal)
    for plan in plans.values():
        rec = outcome_record(plan)
        if rec is None:
            continue
        try:
            journal.append_outcome(rec)
        except JournalError as e:    # a query's answer is the same without it (docs/protocol.md §8.4)
            log.error("guest %s: %s", plan.guest, e)
    guests.open_all(configs, {n: p.start for n, p in plans.items()})
    for plan in plans.values():
        if not plan.outcome:
            continue
        entry = registry.guests[plan.guest]
        entry.notes.append(plan.note)
        registry.count_recovery(plan.outcome)
        log.warning("guest %s: recovery after restart: %s", plan.guest, plan.note)
        if plan.start == "outcome-unknown" and entry.state is LifecycleState.OUTCOME_UNKNOWN:
            host, _, port = plan.peer.rpartition(":")
            mrec, _ = migrations.ledger.begin(plan.guest, "source", plan.peer,
                                              migration_id=plan.migration_id)
            registry.update(mrec, state="unsettled")
            migrations.ledger.park(mrec)
            migrations.resolution.add(Unsettled(mrec, entry, "source", host.strip("[]"),
                                                int(port) if port.isdigit() else 0, None))


def outcome_record(plan: RecoveryPlan) -> OutcomeRecord | None:
    """The record ``plan`` writes first (its ``write``), as the side it was."""
    if plan.write is None or not plan.migration_id:
        return None
    role = "source" if plan.write is _O.ROLLED_BACK else "destination"
    return OutcomeRecord(plan.migration_id, plan.guest, role, plan.write, plan.peer,
                         time.time(), f"the daemon restarted: {plan.note}")
