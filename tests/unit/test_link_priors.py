"""The daemon's bandwidth priors, shared between its migrations (``daemon/link_priors.py``;
docs/architecture.md §4): leases for one destination share a running lookup, a child's own
answer serves later leases without a child until it is ``FRESH_S`` old, an "unknown"
answer is never kept, and a shared child is killed only when its last lease closes.

The children are small Python programs (``LinkPriorLookup``'s ``command``) that append a
line to a file when they start, so a test counts them."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.daemons import wait_until
from vfiod.daemon.link_prior_lookup import LinkPriorLookup
from vfiod.daemon.link_priors import FRESH_S, LinkPriors, PriorLease
from vfiod.migration.planning.linkprior import LinkPrior

DEST, OTHER = "192.0.2.10", "192.0.2.20"
#: what the answering child prints for its destination (argv[-1])
ANSWER = ("import json, sys; print(json.dumps({'destination': sys.argv[-1], 'ifname': "
          "'eth9', 'speed_bps': 1.25e9, 'mtu': 9000, 'note': 'eth9 10000 Mb/s'}))")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Children:
    """Lookups whose child runs ``body`` after writing its destination to ``log``."""

    def __init__(self, tmp: Path, body: str) -> None:
        self.log = tmp / "started"
        self.body = body
        self.made: list[LinkPriorLookup] = []

    def __call__(self, destination: str,
                 on_answer: Callable[[LinkPrior, bool], None]) -> LinkPriorLookup:
        code = (f"import sys; open({str(self.log)!r}, 'a').write(sys.argv[-1] + ' '); "
                + self.body)
        lookup = LinkPriorLookup(destination, command=[sys.executable, "-c", code],
                                 on_answer=on_answer)
        self.made.append(lookup)
        return lookup

    def started(self) -> list[str]:
        return self.log.read_text().split() if self.log.exists() else []

    def reaped(self) -> bool:
        for lookup in self.made:
            if lookup.pid is not None:
                try:
                    os.waitpid(lookup.pid, os.WNOHANG)
                except ChildProcessError:
                    continue            # reaped by its lookup's thread
                return False
        return True


def _answered(lease: PriorLease) -> None:
    lookup = lease.lookup
    assert lookup is not None
    wait_until(lambda: lookup.answered, 60, "the lookup's answer")


def test_a_childs_answer_serves_later_leases_until_it_is_stale(tmp_path: Path) -> None:
    clock, children = Clock(), Children(tmp_path, ANSWER)
    priors = LinkPriors(clock=clock, new_lookup=children)
    first = priors.lease(DEST)
    _answered(first)
    first.close()
    answer = first.current()
    assert answer.ifname == "eth9" and answer.speed_bps == 1.25e9

    clock.now += FRESH_S - 1
    kept = priors.lease(DEST)
    assert kept.lookup is None and kept.current() == answer     # no child for it
    kept.close()
    assert children.started() == [DEST]

    clock.now += 1                                               # FRESH_S old: asked again
    again = priors.lease(DEST)
    assert again.lookup is not None
    _answered(again)
    again.close()
    assert children.started() == [DEST, DEST] and children.reaped()


def test_leases_share_a_running_lookup_and_its_last_close_kills_the_child(
        tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)                   # nobody writes it: the child blocks until killed
    children = Children(tmp_path, f"open({str(gate)!r}).read()")
    priors = LinkPriors(new_lookup=children)
    a, b = priors.lease(DEST), priors.lease(DEST)
    assert a.lookup is not None and a.lookup is b.lookup
    wait_until(lambda: children.started() == [DEST], 60, "the child to start")
    a.close()
    assert not b.lookup.answered and b.current().speed_bps is None   # still running
    assert "still running" in b.current().note
    b.close()                                       # the last lease: the child is killed
    assert b.lookup.answered and children.reaped()
    assert "ended before the route lookup" in b.current().note
    # a killed lookup's "unknown" is not kept: the next migration asks again
    c = priors.lease(DEST)
    assert c.lookup is not None and c.lookup is not b.lookup
    c.close()
    assert children.reaped()


@pytest.mark.parametrize("body", ["sys.exit(3)", "print('not a prior')",
                                  "print(" + repr(json.dumps({
                                      "destination": OTHER, "ifname": None,
                                      "speed_bps": None, "mtu": None, "note": "x"})) + ")"])
def test_an_unknown_answer_is_not_kept(tmp_path: Path, body: str) -> None:
    children = Children(tmp_path, body)
    priors = LinkPriors(new_lookup=children)
    first = priors.lease(DEST)
    _answered(first)
    first.close()
    assert first.current().ifname is None and first.current().speed_bps is None
    second = priors.lease(DEST)
    assert second.lookup is not None and second.lookup is not first.lookup
    _answered(second)
    second.close()
    assert children.started() == [DEST, DEST] and children.reaped()


def test_each_destination_has_its_own_lookup_and_answer(tmp_path: Path) -> None:
    children = Children(tmp_path, ANSWER)
    priors = LinkPriors(new_lookup=children)
    leases = [priors.lease(DEST), priors.lease(OTHER)]
    assert leases[0].lookup is not leases[1].lookup
    for lease in leases:
        _answered(lease)
        lease.close()
    assert [lease.current().destination for lease in leases] == [DEST, OTHER]
    assert sorted(children.started()) == sorted([DEST, OTHER])
    assert priors.lease(OTHER).current().destination == OTHER       # kept, per destination
