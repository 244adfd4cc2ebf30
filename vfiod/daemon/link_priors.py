"""The bandwidth priors of the daemon's outgoing migrations, shared between them
(docs/architecture.md §4; docs/benchmarks.md §2).

A prior comes from a child process (``link_prior_lookup.py``) that starts Python and
imports pyroute2 and asyncio for two netlink queries: about 0.3 CPU-seconds, more than a
migration of 128 MiB spends moving its bytes on a two-core host. Eight migrations started
at once to one destination spawned eight such children, as much CPU as the source daemon
itself spent on them (docs/benchmarks.md §2). The route to a host and its link do not
change from one migration to the next, so:

* a child's answer for a destination is reused for ``FRESH_S`` seconds (no child at all);
* while a lookup for a destination runs, a migration to it shares that lookup;
* only a child's own answer is kept: an "unknown" prior (the child could not start,
  failed, hung, or every migration waiting for it ended first) is not, and the next
  migration asks again.

``LinkPriors.lease(destination)`` gives each migration a ``PriorLease``: ``current()``
answers as ``LinkPriorLookup.current`` does, and ``close()`` at the migration's end; the
last lease of a running lookup closes it (its child is killed and reaped).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vfiod.daemon.link_prior_lookup import LinkPriorLookup
from vfiod.migration.planning.linkprior import LinkPrior

#: how long a child's answer stands for later migrations to the same destination: a
#: route or a link that changes is seen by the first migration a minute later, and a
#: migration measures its own bandwidth after 2 ms of sending anyway
FRESH_S = 60.0

#: makes a lookup for a destination, told its answer: (answer, the child's own or not)
LookupFactory = Callable[[str, Callable[[LinkPrior, bool], None]], LinkPriorLookup]


def _child_lookup(destination: str,
                  on_answer: Callable[[LinkPrior, bool], None]) -> LinkPriorLookup:
    return LinkPriorLookup(destination, on_answer=on_answer)


@dataclass
class _Running:
    """A lookup in progress and the leases that wait for it."""
    lookup: LinkPriorLookup
    leases: int = 0


class PriorLease:
    """One migration's prior: a kept answer, or a share of a running lookup."""

    def __init__(self, owner: LinkPriors, destination: str, running: _Running | None,
                 kept: LinkPrior | None) -> None:
        self._owner, self.destination = owner, destination
        self._running, self._kept = running, kept
        self._closed = False

    @property
    def lookup(self) -> LinkPriorLookup | None:
        """The lookup this lease shares; None when a kept answer served it (tests)."""
        return None if self._running is None else self._running.lookup

    def current(self) -> LinkPrior:
        if self._running is None:
            assert self._kept is not None
            return self._kept
        return self._running.lookup.current()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._running is not None:
                self._owner._release(self.destination, self._running)


class LinkPriors:
    """The daemon's priors by destination (see the module)."""

    def __init__(self, *, fresh_s: float = FRESH_S,
                 clock: Callable[[], float] = time.monotonic,
                 new_lookup: LookupFactory = _child_lookup) -> None:
        """``new_lookup`` and ``clock``: tests give children of their own and a clock they
        move."""
        self._fresh_s, self._clock, self._new_lookup = fresh_s, clock, new_lookup
        self._lock = threading.Lock()
        self._running: dict[str, _Running] = {}
        self._kept: dict[str, tuple[float, LinkPrior]] = {}

    def lease(self, destination: str) -> PriorLease:
        """A prior for a migration to ``destination``, at once (see the module)."""
        with self._lock:
            now = self._clock()
            for stale in [d for d, (t, _) in self._kept.items() if now - t >= self._fresh_s]:
                del self._kept[stale]          # one entry per destination, and not for long
            kept = self._kept.get(destination)
            if kept is not None:
                return PriorLease(self, destination, None, kept[1])
            running = self._running.get(destination)
            if running is None or running.lookup.answered:
                running = _Running(self._new_lookup(
                    destination, lambda answer, own: self._answered(destination, answer, own)))
                self._running[destination] = running
                running.lookup.start()        # its thread starts the child
            running.leases += 1
            return PriorLease(self, destination, running, None)

    def _answered(self, destination: str, answer: LinkPrior, own: bool) -> None:
        """A lookup's final answer (on its thread): a child's own is kept."""
        if own:
            with self._lock:
                self._kept[destination] = (self._clock(), answer)

    def _release(self, destination: str, running: _Running) -> None:
        with self._lock:
            running.leases -= 1
            last = running.leases == 0
            if last and self._running.get(destination) is running:
                del self._running[destination]
        if last:
            running.lookup.close()        # outside the lock: it waits for the thread
