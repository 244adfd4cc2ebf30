"""Unsettled migrations: a source that committed and heard nothing, a destination that
prepared and got no COMMIT, and how they are settled (docs/architecture.md §1.7;
docs/protocol.md §8.4).

``Resolution`` keeps every unsettled migration of the daemon. Its thread asks each one's
peer about it (``outcomes.ask_outcome``) every ``interval_s`` at first, then less often
(``MAX_INTERVAL_S``), until an answer settles it:

    source       peer "resumed"                         → finish here: migrated away
                 peer "discarded" | "lost" | "unknown"  → roll back, resume here
    destination  peer "committed"                       → resume here
                 peer "rolled-back" | "unknown"         → discard

Answers that do not settle (``prepared``, ``in-progress``) and unreachable peers mean:
ask again. It also answers the peers' queries about them (``answer``), and settles one
by hand (``resolve_by_hand``, ``vfiod ctl resolve``) only when the peer cannot answer.
The settling itself (journal, lifecycle, the guest's devices) is the ``Settler``'s:
``MigrationService`` implements it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from vfiod.daemon.offer import Offer
from vfiod.daemon.outcomes import OutcomeAnswer
from vfiod.daemon.registry import GuestEntry, MigrationRecord
from vfiod.migration.session.dest import DestinationSession
from vfiod.migration.session.source import SourceSession

log = logging.getLogger("vfiod.resolution")

#: the first retry; each unanswered or unsettling round doubles it up to ``MAX_INTERVAL_S``
INTERVAL_S = 0.5
MAX_INTERVAL_S = 10.0
#: one query's connect and answer
QUERY_TIMEOUT_S = 5.0

#: the peer's answers that settle each side, and to what: True = the guest runs there
#: (source) / here (destination)
SOURCE_SETTLES = {"resumed": True, "discarded": False, "lost": False, "unknown": False}
DEST_SETTLES = {"committed": True, "rolled-back": False, "unknown": False}


@dataclass(eq=False)
class Unsettled:
    """One unsettled migration. ``session`` is None after a restart: the process died,
    so its devices were reset and there is no session state to keep or finish."""

    rec: MigrationRecord
    entry: GuestEntry
    role: str                              # "source" | "destination"
    peer_host: str
    peer_port: int                         # 0: the peer cannot be asked
    session: SourceSession | DestinationSession | None
    since: float = field(default_factory=time.time)
    last_answer: str = ""                  # the peer's last answer and when it came
    last_answer_at: float | None = None
    last_error: str = ""
    next_ask: float = 0.0
    interval_s: float = INTERVAL_S

    def query(self) -> Offer:
        return Offer(self.rec.guest, self.rec.id, kind="query", role=self.role,
                     decision="commit" if self.role == "source" else "")

    def describe(self) -> dict[str, object]:
        return {"migration_id": self.rec.id, "role": self.role,
                "peer": f"{self.peer_host}:{self.peer_port}" if self.peer_port else "",
                "since": self.since, "peer_last_answer": self.last_answer or None,
                "peer_last_answer_at": self.last_answer_at,
                "peer_last_error": self.last_error or None}


class Settler(Protocol):
    def settle(self, item: Unsettled, runs_there_or_here: bool, why: str) -> bool:
        """Settle ``item``; False if it could not be (the journal refused): ask again."""


Asker = Callable[[Unsettled], OutcomeAnswer]


class Resolution:
    def __init__(self, settler: Settler, ask: Asker,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settler, self._ask, self._clock = settler, ask, clock
        self._items: dict[str, Unsettled] = {}
        self._lock = threading.Lock()          # _items; never held while asking
        self._settling = threading.Lock()      # one settle at a time (thread, query, hand)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the set -----------------------------------------------------------------------------
    def add(self, item: Unsettled) -> None:
        with self._lock:
            self._items[item.rec.id] = item
        item.entry.unsettled = item.describe()
        log.warning("migration %s (%s of %s): outcome unsettled; asking %s:%s", item.rec.id,
                    item.role, item.rec.guest, item.peer_host, item.peer_port)
        self._wake.set()

    def get(self, migration_id: str) -> Unsettled | None:
        with self._lock:
            return self._items.get(migration_id)

    def of_guest(self, guest: str) -> Unsettled | None:
        with self._lock:
            return next((i for i in self._items.values() if i.rec.guest == guest), None)

    def items(self) -> list[Unsettled]:
        with self._lock:
            return list(self._items.values())

    # -- settling ----------------------------------------------------------------------------
    def _settle(self, item: Unsettled, runs: bool, why: str) -> bool:
        with self._settling:
            with self._lock:
                if self._items.get(item.rec.id) is not item:
                    return True                    # settled meanwhile
            if not self._settler.settle(item, runs, why):
                return False
            with self._lock:
                self._items.pop(item.rec.id, None)
            item.entry.unsettled = None
            return True

    def settle_on(self, item: Unsettled, answer: OutcomeAnswer) -> bool:
        """Settle ``item`` if ``answer`` (the peer's) does; True if it is settled now."""
        item.last_answer, item.last_answer_at = answer.outcome, time.time()
        table = SOURCE_SETTLES if item.role == "source" else DEST_SETTLES
        if answer.outcome not in table:
            return False
        return self._settle(item, table[answer.outcome],
                            f"the peer's journal says {answer.outcome}")

    def ask_once(self, item: Unsettled) -> bool:
        """Ask the peer about ``item`` now; True if that settled it."""
        if not item.peer_port:
            item.last_error = "the peer gave no address to ask"
            return False
        try:
            answer = self._ask(item)
        except Exception as e:  # noqa: BLE001 - unreachable, refused, garbled: ask again
            item.last_error = str(e)
            item.entry.unsettled = item.describe()
            log.info("migration %s: asking %s:%s: %s", item.rec.id, item.peer_host,
                     item.peer_port, e)
            return False
        item.last_error = ""
        settled = self.settle_on(item, answer)
        if not settled:
            item.entry.unsettled = item.describe()
        return settled

    def resolve_by_hand(self, guest: str, resume_here: bool) -> str:
        """``vfiod ctl resolve``: ask the peer once more; only if it cannot answer, settle as
        the operator says. Returns what happened; ``ValueError`` when refused."""
        item = self.of_guest(guest)
        if item is None:
            raise ValueError(f"guest {guest} has no unsettled migration")
        if self.ask_once(item):
            return (f"settled by the peer's answer ({item.last_answer}); the operator's "
                    "choice was not needed")
        if item.last_answer and not item.last_error:
            raise ValueError(
                f"the peer answers {item.last_answer!r} for migration {item.rec.id}: it "
                "is alive and will settle it; resolve by hand only when it is gone")
        if resume_here and item.role == "source" and item.last_answer == "resumed":
            raise ValueError(f"the peer confirmed it resumed guest {guest}: refusing to "
                             "resume it here too")
        # source: "resume here" = the peer never ran it; destination: = the source committed
        runs = (not resume_here) if item.role == "source" else resume_here
        how = "resume here" if resume_here else "discard here"
        if not self._settle(item, runs, f"resolved by hand ({how}); the peer could not be "
                            f"asked: {item.last_error}"):
            raise ValueError(f"guest {guest}: the journal could not record the resolution")
        return f"resolved by hand: {how}"

    # -- the thread --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vfiod-resolution",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(QUERY_TIMEOUT_S + 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self._clock()
            due = [i for i in self.items() if i.next_ask <= now]
            for item in due:
                if self._stop.is_set():
                    return
                if not self.ask_once(item):
                    item.interval_s = min(MAX_INTERVAL_S, item.interval_s * 2)
                    item.next_ask = self._clock() + item.interval_s
            left = [i.next_ask for i in self.items()]
            self._wake.wait(max(0.05, min(left) - self._clock()) if left else None)
            self._wake.clear()
