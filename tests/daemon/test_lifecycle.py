"""The guest lifecycle (docs/architecture.md §1 steps 5-8, §7): the transition table, checked over
every pair of states; the error for a refused transition; ``GuestLifecycle`` as the only
writer (the registry shows states read-only); every transition logged with its cause; and
records that survive a journal round trip and replay to the same states."""

from __future__ import annotations

import json
import logging
from collections import deque
from itertools import pairwise, product

import pytest

from vfiod.daemon.config import GuestConfig, RamConfig
from vfiod.daemon.lifecycle import (
    ALLOWED_TRANSITIONS,
    RUNS_HERE,
    GuestLifecycle,
    LifecycleError,
    LifecycleState,
    LifecycleTransition,
)
from vfiod.daemon.registry import Registry
from vfiod.errors import VfiodError

S = LifecycleState

#: The flows the daemon and the commit protocol take, step by step.
FLOWS = {
    "start, run here": [S.DEFINED, S.CLAIMED, S.RUNNING],
    "start, wait for a migration": [S.DEFINED, S.CLAIMED, S.INCOMING],
    "cannot be opened": [S.DEFINED, S.FAILED],
    "migrated away, then ready to come back": [
        S.RUNNING, S.MIGRATING_OUT, S.SWITCHING_OVER, S.MIGRATED_AWAY, S.DEFINED, S.CLAIMED,
        S.INCOMING],
    "cancelled in pre-copy": [S.RUNNING, S.MIGRATING_OUT, S.RUNNING],
    "failed in stop-and-copy": [S.RUNNING, S.MIGRATING_OUT, S.SWITCHING_OVER, S.RUNNING],
    "failed receive, re-opened": [S.INCOMING, S.DEFINED, S.CLAIMED, S.INCOMING],
    "received, prepared, then resumed on COMMIT": [S.INCOMING, S.LOADED, S.PREPARED,
                                                   S.RUNNING],
    "restarted after a commit, settled": [S.DEFINED, S.CLAIMED, S.OUTCOME_UNKNOWN, S.RUNNING],
    "commit: source aborted after prepare": [S.PREPARED, S.DEFINED],
    "commit: no answer, peer resumed": [S.SWITCHING_OVER, S.OUTCOME_UNKNOWN,
                                        S.MIGRATED_AWAY],
    "commit: no answer, peer discarded": [S.SWITCHING_OVER, S.OUTCOME_UNKNOWN, S.RUNNING],
    "daemon stops": [S.RUNNING, S.DEFINED],
}

#: Steps that must never be allowed, and why.
FORBIDDEN = {
    (S.DEFINED, S.RUNNING): "nothing is open yet",
    (S.RUNNING, S.MIGRATED_AWAY): "no migration ran",
    (S.MIGRATING_OUT, S.MIGRATED_AWAY): "the guest never paused for the switchover",
    (S.INCOMING, S.RUNNING): "nothing was loaded",
    (S.INCOMING, S.PREPARED): "nothing was loaded",
    (S.MIGRATING_OUT, S.DEFINED): "released under a running migration",
    (S.SWITCHING_OVER, S.DEFINED): "released under a running migration",
    (S.LOADED, S.RUNNING): "resumed without the source's commit",
    (S.MIGRATED_AWAY, S.RUNNING): "two hosts would run the guest",
    (S.FAILED, S.RUNNING): "a failed guest is re-opened, not resumed",
    (S.RUNNING, S.RUNNING): "not a transition",
}


def _path_to(target: LifecycleState) -> list[LifecycleState]:
    """The shortest allowed path from ``defined`` to ``target``."""
    prev: dict[LifecycleState, LifecycleState | None] = {S.DEFINED: None}
    todo = deque([S.DEFINED])
    while todo:
        s = todo.popleft()
        for a, b in sorted(ALLOWED_TRANSITIONS):
            if a is s and b not in prev:
                prev[b] = s
                todo.append(b)
    assert target in prev, f"{target} cannot be reached from defined"
    path: list[LifecycleState] = []
    step: LifecycleState | None = target
    while step is not None:
        path.append(step)
        step = prev[step]
    return path[::-1]


def _at(state: LifecycleState) -> GuestLifecycle:
    lc = GuestLifecycle(clock=lambda: 1000.0)
    lc.add("g1")
    for to in _path_to(state)[1:]:
        lc.move("g1", to, f"test: towards {state}")
    assert lc.state("g1") is state
    return lc


@pytest.mark.parametrize("from_state, to_state", list(product(S, S)),
                         ids=lambda s: str(s))
def test_every_pair_follows_the_table(from_state: LifecycleState,
                                      to_state: LifecycleState) -> None:
    lc = _at(from_state)
    if (from_state, to_state) in ALLOWED_TRANSITIONS:
        rec = lc.move("g1", to_state, "test step", migration_id="m1", peer="10.0.0.2:4444")
        assert rec == LifecycleTransition("g1", from_state, to_state, "test step", "m1",
                                          "10.0.0.2:4444", 1000.0)
        assert lc.state("g1") is to_state
    else:
        with pytest.raises(LifecycleError) as e:
            lc.move("g1", to_state, "test step")
        assert (e.value.guest, e.value.from_state, e.value.to_state, e.value.cause) == (
            "g1", from_state, to_state, "test step")
        assert lc.state("g1") is from_state           # a refused step changes nothing


@pytest.mark.parametrize("name", list(FLOWS))
def test_the_flows_are_allowed(name: str) -> None:
    for pair in pairwise(FLOWS[name]):
        assert pair in ALLOWED_TRANSITIONS, (name, pair)


def test_forbidden_steps_and_the_error() -> None:
    for pair, why in FORBIDDEN.items():
        assert pair not in ALLOWED_TRANSITIONS, why
    lc = _at(S.RUNNING)
    with pytest.raises(LifecycleError, match=r"^guest g1: lifecycle transition running -> "
                       r"migrated-away is not allowed \(cause: the peer said so\)$"):
        lc.move("g1", S.MIGRATED_AWAY, "the peer said so")


def test_any_state_may_fail_and_only_settled_ones_release() -> None:
    assert all((s, S.FAILED) in ALLOWED_TRANSITIONS for s in S if s is not S.FAILED)
    # outcome-unknown is released only by a stop: the journal keeps its commit record
    # (the stop does not journal releases), so the restart asks the peer again
    held = {S.MIGRATING_OUT, S.SWITCHING_OVER, S.DEFINED}
    assert {a for a, b in ALLOWED_TRANSITIONS if b is S.DEFINED} == set(S) - held
    assert RUNS_HERE == {S.RUNNING, S.MIGRATING_OUT, S.SWITCHING_OVER}


def test_release_is_idempotent_and_failure_names_the_cause() -> None:
    lc = GuestLifecycle()
    lc.add("g1")
    assert lc.release("g1", "stopping") is None          # holds nothing: no step
    rec = lc.move("g1", S.FAILED, "0000:3b:00.1 is not migratable")
    assert lc.failure("g1") == "0000:3b:00.1 is not migratable" == rec.cause
    assert lc.release("g1", "stopping") is not None and lc.state("g1") is S.DEFINED
    assert lc.failure("g1") is None
    with pytest.raises(ValueError, match="registered twice"):
        lc.add("g1")


def test_every_transition_is_logged_with_its_cause(caplog: pytest.LogCaptureFixture
                                                   ) -> None:
    lc = GuestLifecycle()
    lc.add("g1")
    with caplog.at_level(logging.INFO, logger="vfiod.lifecycle"):
        lc.move("g1", S.CLAIMED, "devices and RAM opened")
        lc.move("g1", S.RUNNING, "runs here")
        lc.move("g1", S.MIGRATING_OUT, "ordered", migration_id="abc", peer="h:1")
    assert [r.getMessage() for r in caplog.records] == [
        "guest g1: defined -> claimed: devices and RAM opened",
        "guest g1: claimed -> running: runs here",
        "guest g1: running -> migrating-out: ordered (migration abc, peer h:1)"]


def test_registry_shows_states_read_only() -> None:
    reg = Registry()
    entry = reg.add_guest(GuestConfig("g1", (RamConfig("ram0", 0, 1 << 20),)))
    assert entry.state is S.DEFINED
    with pytest.raises(AttributeError):
        entry.state = S.RUNNING  # type: ignore[misc]
    with pytest.raises(AttributeError):
        entry.error = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        reg.guests["g2"] = entry  # type: ignore[index]
    states = reg.lifecycle.states()
    states["g1"] = S.RUNNING                               # a copy
    snap = reg.snapshot()
    snap["guests"][0]["state"] = "running"                 # a copy too
    assert reg.snapshot()["guests"][0]["state"] == "defined"
    # The owner is the way in, and the registry shows what it wrote.
    reg.lifecycle.move("g1", S.CLAIMED, "opened")
    reg.lifecycle.move("g1", S.FAILED, "broke")
    g = reg.snapshot()["guests"][0]
    assert (g["state"], g["error"]) == ("failed", "broke")
    assert reg.guest("g1") is entry and entry.error == "broke"


def _history() -> tuple[GuestLifecycle, list[LifecycleTransition]]:
    lc = GuestLifecycle()
    records = []
    for g in ("src", "dst", "bad"):
        lc.add(g)
    steps = [("src", S.CLAIMED), ("src", S.RUNNING), ("dst", S.CLAIMED),
             ("dst", S.INCOMING), ("src", S.MIGRATING_OUT), ("src", S.SWITCHING_OVER),
             ("dst", S.LOADED), ("dst", S.PREPARED), ("src", S.OUTCOME_UNKNOWN),
             ("dst", S.RUNNING), ("src", S.MIGRATED_AWAY), ("bad", S.FAILED)]
    for guest, to in steps:
        records.append(lc.move(guest, to, f"step to {to}", migration_id="m1",
                               peer="other"))
    return lc, records


def test_replay_through_a_journal_rebuilds_the_states() -> None:
    lc, records = _history()
    journal = "\n".join(json.dumps(r.to_json()) for r in records)
    read = [LifecycleTransition.from_json(json.loads(line)) for line in journal.splitlines()]
    assert read == records
    again = GuestLifecycle()
    again.replay(read)
    assert again.states() == lc.states() == {
        "src": S.MIGRATED_AWAY, "dst": S.RUNNING, "bad": S.FAILED}
    assert again.failure("bad") == "step to failed"


def test_replay_refuses_a_journal_that_skips_a_step() -> None:
    _, records = _history()
    lc = GuestLifecycle()
    with pytest.raises(LifecycleError, match="does not follow from defined"):
        lc.replay(records[1:])                  # src: claimed -> running, from defined
    forged = LifecycleTransition("x", S.DEFINED, S.RUNNING, "forged")
    with pytest.raises(LifecycleError, match="is not allowed"):
        GuestLifecycle().replay([forged])


@pytest.mark.parametrize("bad, message", [
    ({"guest": "g1", "to": "running", "cause": "c", "at": 1.0}, "has no 'from'"),
    ({"guest": "g1", "from": "stopped", "to": "running", "cause": "c", "at": 1.0},
     "'stopped' is not a valid LifecycleState"),
])
def test_a_bad_journal_record_is_refused(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LifecycleTransition.from_json(bad)


def test_a_journal_that_cannot_write_refuses_only_what_must_be_recorded(
        caplog: pytest.LogCaptureFixture) -> None:
    def full(rec: LifecycleTransition) -> None:
        raise VfiodError("journal /x/journal: appending: No space left on device (ENOSPC)")
    lc = _at(S.RUNNING)
    lc.record = full
    with pytest.raises(VfiodError, match="No space left"):
        lc.move("g1", S.MIGRATING_OUT, "ordered", must_record=True)
    assert lc.state("g1") is S.RUNNING                 # refused: nothing started
    lc.record = None
    lc.move("g1", S.MIGRATING_OUT, "ordered")
    lc.record = full
    lc.move("g1", S.RUNNING, "rolled back")            # follows the facts: made, and said
    assert lc.state("g1") is S.RUNNING
    assert "not journaled" in caplog.text and "No space left" in caplog.text
