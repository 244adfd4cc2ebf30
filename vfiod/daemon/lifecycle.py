"""The guest lifecycle: the states a guest of the daemon goes through, the transitions
allowed between them, and ``GuestLifecycle``, the one writer of those states
(docs/architecture.md §1 steps 5-8, §7).

    start:     defined → claimed → running | incoming      (or defined → failed)
    outgoing:  running → migrating-out → switching-over → migrated-away
               migrating-out | switching-over → running   (cancelled or failed: rolled back)
               switching-over → outcome-unknown → migrated-away | running   (step 7)
    incoming:  incoming → loaded → running, or loaded → prepared → running   (step 5)
    release:   → defined (fds and RAM closed: the daemon stops, or re-opens the guest)

* defined: configured, nothing held. Every guest starts here, and returns here when the
  daemon releases it (stopping, or before re-opening it fresh); a release is allowed from
  every state that holds nothing in flight.
* claimed: its containers, groups, device fds and RAM are open and probed, its role not
  yet given.
* running: runs here (configured so, or received and resumed here).
* migrating-out: a migration to a peer was ordered; pre-copy while the guest runs.
* switching-over: paused; the final device state and RAM go to the peer.
* migrated-away: the peer acknowledged that it resumed the guest.
* outcome-unknown: committed, and the peer never answered (step 7 settles it).
* incoming: opened fresh (zeroed RAM, devices ready to load), waiting for or receiving a
  migration.
* loaded: everything received and loaded into the devices.
* prepared: loaded and verified, not running: waiting for the source's commit.
* failed: could not be opened, or broke beyond recovery; the cause says why. Any state
  may fail.

A receive goes incoming → loaded → prepared (journaled before the destination answers
PREPARED) → running (journaled on COMMIT, before the devices resume). A source that
committed and heard nothing goes switching-over → outcome-unknown until the peer's journal
answers (§1.7). After a restart every guest starts ``defined`` (the process death released
everything) and ``recovery.py`` decides from the journal what it becomes; a source whose
committed migration has no outcome is opened and goes claimed → outcome-unknown.

Every transition is one immutable ``LifecycleTransition`` (guest, from, to, cause,
migration id, peer, time), logged with its cause when made. ``record``, when given, writes
it to the journal (docs/architecture.md §1.8) before the state changes: a transition the
journal cannot hold does not happen. Records are read back with ``from_json``. A restart does not
replay the whole chain: a process death released everything, so ``recovery.py`` decides
from each guest's last record and its migration's outcome. ``GuestLifecycle.replay``
checks a chain of records against the table; the daemon itself does not call it.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vfiod.errors import VfiodError

log = logging.getLogger("vfiod.lifecycle")


class LifecycleState(enum.StrEnum):
    DEFINED = "defined"
    CLAIMED = "claimed"
    RUNNING = "running"
    MIGRATING_OUT = "migrating-out"
    SWITCHING_OVER = "switching-over"
    OUTCOME_UNKNOWN = "outcome-unknown"
    MIGRATED_AWAY = "migrated-away"
    INCOMING = "incoming"
    LOADED = "loaded"
    PREPARED = "prepared"
    FAILED = "failed"


_S = LifecycleState

#: States in which the guest is this host's to run: it runs, or it is being migrated
#: away and the peer has not taken it over yet.
RUNS_HERE = frozenset({_S.RUNNING, _S.MIGRATING_OUT, _S.SWITCHING_OVER})

#: An outgoing migration holds the guest (its thread writes the next state).
OUTGOING = frozenset({_S.MIGRATING_OUT, _S.SWITCHING_OVER})

#: Where each state may go. Any state may fail (the cause says why); a release (back to
#: ``defined``) is refused while an outgoing migration holds the guest or its outcome is
#: unsettled.
_NEXT: dict[LifecycleState, frozenset[LifecycleState]] = {
    _S.DEFINED: frozenset({
        _S.CLAIMED,                 # opened and probed
        _S.FAILED}),                # could not be opened
    _S.CLAIMED: frozenset({
        _S.RUNNING,                 # configured to run here
        _S.INCOMING,                # configured (or re-opened) to receive
        _S.OUTCOME_UNKNOWN,         # restarted after a commit with no outcome (§1.8)
        _S.DEFINED, _S.FAILED}),
    _S.RUNNING: frozenset({
        _S.MIGRATING_OUT,           # a migration to a peer was ordered
        _S.DEFINED, _S.FAILED}),
    _S.MIGRATING_OUT: frozenset({
        _S.SWITCHING_OVER,          # paused for stop-and-copy
        _S.RUNNING,                 # cancelled or failed: rolled back
        _S.FAILED}),
    _S.SWITCHING_OVER: frozenset({
        _S.MIGRATED_AWAY,           # the peer resumed it
        _S.OUTCOME_UNKNOWN,         # committed, no answer
        _S.RUNNING,                 # cancelled or failed before the commit: rolled back
        _S.FAILED}),
    _S.OUTCOME_UNKNOWN: frozenset({
        _S.MIGRATED_AWAY,           # settled: the peer resumed it
        _S.RUNNING,                 # settled: the peer discarded it; resumed here
        _S.DEFINED,                 # the daemon stops: the journal keeps the commit
        _S.FAILED}),
    _S.MIGRATED_AWAY: frozenset({
        _S.DEFINED, _S.FAILED}),
    _S.INCOMING: frozenset({
        _S.LOADED,                  # everything received and loaded
        _S.DEFINED, _S.FAILED}),    # a failed receive is discarded
    _S.LOADED: frozenset({
        _S.PREPARED,                # verified, waiting for the commit
        _S.DEFINED, _S.FAILED}),
    _S.PREPARED: frozenset({
        _S.RUNNING,                 # commit received: resumed
        _S.DEFINED, _S.FAILED}),    # the source aborted: discarded
    _S.FAILED: frozenset({
        _S.DEFINED}),
}

#: Every allowed (from, to) pair; anything else raises ``LifecycleError``.
ALLOWED_TRANSITIONS: frozenset[tuple[LifecycleState, LifecycleState]] = frozenset(
    (a, b) for a, tos in _NEXT.items() for b in tos)


class LifecycleError(VfiodError):
    """A transition the table does not allow (or a replayed record that does not follow
    from the guest's current state)."""

    def __init__(self, guest: str, from_state: LifecycleState,
                 to_state: LifecycleState, cause: str, why: str = "is not allowed") -> None:
        self.guest, self.from_state, self.to_state, self.cause = (guest, from_state,
                                                                  to_state, cause)
        super().__init__(f"guest {guest}: lifecycle transition {from_state} -> {to_state} "
                         f"{why} (cause: {cause})")


@dataclass(frozen=True, slots=True)
class LifecycleTransition:
    """One lifecycle step of one guest, as a journal line holds it."""

    guest: str
    from_state: LifecycleState
    to_state: LifecycleState
    cause: str
    migration_id: str = ""
    peer: str = ""
    at: float = 0.0               # wall clock (time.time)

    def to_json(self) -> dict[str, Any]:
        return {"guest": self.guest, "from": self.from_state.value, "to": self.to_state.value,
                "cause": self.cause, "migration_id": self.migration_id, "peer": self.peer,
                "at": self.at}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LifecycleTransition:
        """Read one record back; ``ValueError`` names what is missing or unknown."""
        try:
            return cls(str(d["guest"]), LifecycleState(d["from"]), LifecycleState(d["to"]),
                       str(d["cause"]), str(d.get("migration_id", "")),
                       str(d.get("peer", "")), float(d["at"]))
        except KeyError as e:
            raise ValueError(f"lifecycle record {d!r} has no {e.args[0]!r}") from None

    def describe(self) -> str:
        where = ", ".join(x for x in (self.migration_id and f"migration {self.migration_id}",
                                      self.peer and f"peer {self.peer}") if x)
        return (f"guest {self.guest}: {self.from_state} -> {self.to_state}: {self.cause}"
                + (f" ({where})" if where else ""))


class GuestLifecycle:
    """The lifecycle state of every guest, and the only code that changes it.

    ``lock`` is shared with the ``Registry`` that reads these states, so a status answer
    never sees a guest between two writes.
    """

    def __init__(self, lock: threading.RLock | None = None,
                 clock: Callable[[], float] = time.time,
                 record: Callable[[LifecycleTransition], None] | None = None) -> None:
        """``record``: writes a transition down durably before it is made (raises when it
        cannot: the transition is then refused)."""
        self.lock = lock if lock is not None else threading.RLock()
        self._clock = clock
        self.record = record
        self._states: dict[str, LifecycleState] = {}
        self._last: dict[str, LifecycleTransition] = {}

    def add(self, guest: str) -> None:
        """A configured guest; it starts ``defined``."""
        with self.lock:
            if guest in self._states:
                raise ValueError(f"guest {guest} is registered twice")
            self._states[guest] = _S.DEFINED

    # -- reading ---------------------------------------------------------------------------
    def state(self, guest: str) -> LifecycleState:
        with self.lock:
            return self._states[guest]

    def failure(self, guest: str) -> str | None:
        """Why the guest is ``failed`` (the cause of that transition); None otherwise."""
        with self.lock:
            last = self._last.get(guest)
            return last.cause if last is not None and self._states[guest] is _S.FAILED else None

    def states(self) -> dict[str, LifecycleState]:
        with self.lock:
            return dict(self._states)

    # -- writing ---------------------------------------------------------------------------
    def move(self, guest: str, to: LifecycleState, cause: str, *, migration_id: str = "",
             peer: str = "", must_record: bool = False) -> LifecycleTransition:
        """Move ``guest`` to ``to`` for ``cause``; ``LifecycleError`` if the table does
        not allow it from the guest's current state. Returns the record, already logged.

        ``must_record``: the transition allows an action a restart must know about (a
        migration starts; the destination prepares or resumes), so a journal that cannot
        hold it refuses it (the error propagates). Any other transition follows what
        already happened (a rollback, a release, a settled outcome): the restart's
        recovery reaches the same place from the records before it (docs/architecture.md
        §1.8), so a failed write is logged and the state still follows the facts."""
        with self.lock:
            rec = LifecycleTransition(guest, self.state(guest), to, cause, migration_id,
                                      peer, self._clock())
            if (rec.from_state, rec.to_state) not in ALLOWED_TRANSITIONS:
                raise LifecycleError(rec.guest, rec.from_state, rec.to_state, rec.cause)
            if self.record is not None:
                try:
                    self.record(rec)
                except VfiodError as e:
                    if must_record:
                        raise
                    log.error("%s: not journaled (%s); recovery from the records before "
                              "it reaches the same state", rec.describe(), e)
            self._apply(rec)
        log.info("%s", rec.describe())
        return rec

    def check_release(self, guest: str, cause: str) -> None:
        """``LifecycleError`` if ``guest`` may not be released now; nothing changes. The
        caller checks before it closes what the guest holds, and ``release`` after."""
        with self.lock:
            now = self.state(guest)
            if now is not _S.DEFINED and (now, _S.DEFINED) not in ALLOWED_TRANSITIONS:
                raise LifecycleError(guest, now, _S.DEFINED, cause)

    def release(self, guest: str, cause: str) -> LifecycleTransition | None:
        """Back to ``defined`` (the daemon closed what it held); None if it already is."""
        with self.lock:
            if self.state(guest) is _S.DEFINED:
                return None
            return self.move(guest, _S.DEFINED, cause)

    def replay(self, records: Iterable[LifecycleTransition]) -> None:
        """Rebuild states from records (a journal), each checked against the table and
        the guest's state at that point; a guest not known yet starts ``defined``."""
        with self.lock:
            for rec in records:
                self._states.setdefault(rec.guest, _S.DEFINED)
                if rec.from_state is not self._states[rec.guest]:
                    raise LifecycleError(rec.guest, rec.from_state, rec.to_state, rec.cause,
                                         f"does not follow from {self._states[rec.guest]}")
                self._apply(rec)
                log.debug("replayed %s", rec.describe())

    def _apply(self, rec: LifecycleTransition) -> None:
        if (rec.from_state, rec.to_state) not in ALLOWED_TRANSITIONS:
            raise LifecycleError(rec.guest, rec.from_state, rec.to_state, rec.cause)
        self._states[rec.guest] = rec.to_state
        self._last[rec.guest] = rec
