"""A restart recovers each guest from the journal (docs/architecture.md §1.8): the
findings "a restart forgets everything" and "a restart after a clean SIGTERM fails",
with two real daemons on the sim backend whose guest RAM is a file that survives them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.daemons import wait_until
from tests.support.fault_rig import FaultHost, RigGuest, pattern, started_pair, where

G = RigGuest("g1", 1)


@pytest.fixture
def hosts() -> Iterator[tuple[FaultHost, FaultHost]]:
    with started_pair([G]) as pair:
        yield pair.src, pair.dst


def _migrated(a: FaultHost, b: FaultHost) -> None:
    a.migrate(G.name, b.migration_address)
    wait_until(lambda: where([a, b], G.name) == {"src": "incoming", "dst": "running"}, 60,
               lambda: f"{where([a, b], G.name)}\n{a.log()[-3000:]}\n{b.log()[-3000:]}")


@pytest.mark.parametrize("stop", ["sigkill", "sigterm"])
def test_after_a_migration_both_restart_and_the_guest_runs_only_where_it_went(
        hosts: tuple[FaultHost, FaultHost], stop: str) -> None:
    a, b = hosts
    _migrated(a, b)
    for h in (a, b):
        getattr(h, stop)()
    for h in (a, b):
        h.start()
    assert where([a, b], G.name) == {"src": "incoming", "dst": "running"}
    assert b.ram_digest(G.name) == a_pattern_digest()
    notes_a = a.guest(G.name)["notes"]
    assert any("migrated to" in n and "not started here" in n for n in notes_a), notes_a
    notes_b = b.guest(G.name)["notes"]
    assert any("devices reset" in n and "memory kept" in n for n in notes_b), notes_b
    assert G.name in b.journal_text() and "resumed" in b.journal_text()


def a_pattern_digest() -> str:
    import hashlib
    return hashlib.sha256(pattern(G.name, G.ram_bytes)).hexdigest()
