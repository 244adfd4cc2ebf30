"""Answering a peer's outcome query from this host's journal (docs/protocol.md §8.4).

    an unsettled migration here      source: "committed"; destination: "prepared", or,
                                     when a committed source asks, the repeated COMMIT is
                                     delivered (it resumes here) and the answer is
                                     "resumed"
    the journal's latest outcome     committed | resumed-as-confirmed-by-the-peer →
                                     "committed" (a source's), rolled-back, resumed,
                                     discarded, lost; "prepared" with no session running
                                     here means the restart lost it: "lost"
    a migration still running here   "in-progress"
    nothing                          "unknown"
"""

from __future__ import annotations

from vfiod.daemon.journal import Journal, MigrationOutcome
from vfiod.daemon.offer import Offer
from vfiod.daemon.outcomes import OutcomeAnswer
from vfiod.daemon.registry import Registry
from vfiod.daemon.resolution import Resolution

_O = MigrationOutcome


def answer_query(query: Offer, registry: Registry, resolution: Resolution,
                 journal: Journal | None) -> OutcomeAnswer:
    entry = registry.guest(query.guest)
    state = entry.state.value if entry is not None else ""
    item = resolution.get(query.migration_id)
    if item is not None and item.rec.guest == query.guest:
        if item.role == "source":
            return OutcomeAnswer("committed", state)
        if query.decision == "commit" and resolution.settle_on(
                item, OutcomeAnswer("committed")):
            return OutcomeAnswer("resumed", entry.state.value if entry else "")
        return OutcomeAnswer("prepared", state)
    running = entry is not None and entry.migration is not None and \
        entry.migration.id == query.migration_id and entry.migration.active
    rec = journal.outcome(query.migration_id) if journal is not None else None
    if rec is not None and rec.guest == query.guest:
        if rec.role == "source":
            return OutcomeAnswer("rolled-back" if rec.outcome is _O.ROLLED_BACK
                                 else "committed", state)
        if rec.outcome is _O.PREPARED:
            return OutcomeAnswer("in-progress" if running else "lost", state)
        return OutcomeAnswer(rec.outcome.value, state)
    return OutcomeAnswer("in-progress" if running else "unknown", state)
