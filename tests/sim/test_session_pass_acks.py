"""Each pre-copy pass is consumed by the destination before the source predicts and
decides (docs/protocol.md §8.2 ACK pass; docs/architecture.md §4): negotiated in the
HELLO and the HEADER, so a peer without it gets the stream as before; a destination that
never acknowledges fails the migration cleanly, and an operator's cancel is honoured
while the source waits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.session_rig import (
    MiB,
    Side,
    SideContainer,
    add_workload,
    assert_migrated,
    assert_rolled_back,
    migrate,
    side_pairs,
    spec,
)
from vfiod.kernel.sim.workload import DmaTarget
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import SessionConfig
from vfiod.migration.session.status import IterationProgress
from vfiod.migration.transport.control import AckStage, ControlMessage
from vfiod.vfio import RamRegion

RAM = (RamRegion("ram", 0, 64 * MiB),)
DEV = spec("v2_precopy_log")
PLANS = [SideContainer([DEV])]
#: a limit no pass meets, so pre-copy runs pass after pass until the timeout forces it
MANY_PASSES = SessionConfig(policy=Policy(downtime_limit_s=1e-6, timeout_s=1.0,
                                          on_timeout="force"))


@pytest.fixture
def sides(tmp_path: Path) -> Iterator[Any]:
    with side_pairs(tmp_path, PLANS, RAM) as make:
        yield make


def _dirtying(src: Side) -> None:
    wl = add_workload(src, [DmaTarget(DEV.name, 0, 16 * MiB)], dirty_rate_bps=40e6,
                      hot_fraction=0.5, seed=3)
    wl.start()
    wl.wait_for_writes(1)


class DestLink:
    """The destination's connection; ``drop_pass_acks`` swallows its ACK pass frames,
    ``on_drop`` runs when one is swallowed, ``old_peer`` hides ``pass_acks`` from its
    HELLO (a destination from before pass acknowledgements)."""

    def __init__(self, conn: Any, *, drop_pass_acks: bool = False, old_peer: bool = False,
                 on_drop: Any = None) -> None:
        self.conn, self.drop, self.old, self.on_drop = conn, drop_pass_acks, old_peer, on_drop
        self.pass_acks_sent = 0

    def send_control(self, msg: ControlMessage) -> None:
        if msg.stage is AckStage.HELLO and self.old:
            msg = ControlMessage(msg.kind, {k: v for k, v in msg.fields.items()
                                            if k != "pass_acks"}, msg.stage)
        if msg.stage is AckStage.PASS:
            self.pass_acks_sent += 1
            if self.drop:
                if self.on_drop is not None:
                    self.on_drop()
                return
        self.conn.send_control(msg)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_every_prediction_starts_with_the_destination_holding_all_that_was_sent(
        sides: Any) -> None:
    src, dst = sides(fill_bytes=32 * MiB)
    _dirtying(src)
    links: dict[str, Any] = {}
    behind: list[tuple[int, int, int]] = []

    def at_pass(p: IterationProgress) -> None:
        sent, got = links["src"].bytes_sent, links["dst"].conn.bytes_received
        behind.append((p.iteration, sent, got))

    def keep(name: str, wrap: Any = None) -> Any:
        def f(conn: Any) -> Any:
            links[name] = wrap(conn) if wrap is not None else conn
            return links[name]
        return f

    run = migrate(src, dst, MANY_PASSES, progress=at_pass, wrap_source=keep("src"),
                  wrap_dest=keep("dst", DestLink))
    assert_migrated(src, dst, run)
    assert run.source.iterations >= 3
    # at each decision the destination had taken in every byte the source had sent
    assert [(i, s) for i, s, _ in behind] == [(i, g) for i, _, g in behind]
    assert links["dst"].pass_acks_sent == run.source.iterations
    assert run.source.timings["pass_drain_s"] > 0


def test_a_destination_without_pass_acks_gets_the_stream_as_before(sides: Any) -> None:
    src, dst = sides(fill_bytes=4 * MiB)
    _dirtying(src)
    dests: list[DestLink] = []

    def old(conn: Any) -> DestLink:
        dests.append(DestLink(conn, old_peer=True))
        return dests[0]

    run = migrate(src, dst, MANY_PASSES, wrap_dest=old)
    assert_migrated(src, dst, run)
    assert run.source.iterations >= 2
    assert dests[0].pass_acks_sent == 0           # not asked for, never sent
    assert run.source.timings["pass_drain_s"] == 0.0


def test_a_destination_that_never_acknowledges_a_pass_fails_the_migration_cleanly(
        sides: Any) -> None:
    src, dst = sides(fill_bytes=4 * MiB)
    before = src.ram_digest()
    quick = SessionConfig(ack_timeout_s=1.0)
    run = migrate(src, dst, quick,
                  wrap_dest=lambda c: DestLink(c, drop_pass_acks=True))
    assert_rolled_back(src, dst, run, before)
    assert run.source.result == "failed"
    assert "did not acknowledge pre-copy pass 1 within 1 s" in run.source.reason


def test_an_operator_cancel_is_honoured_while_the_source_waits_for_a_pass(
        sides: Any) -> None:
    src, dst = sides(fill_bytes=4 * MiB)
    before = src.ram_digest()
    box: dict[str, Any] = {}
    waited = threading.Event()

    def cancel_when_dropped() -> None:
        # the destination swallowed its ACK: the source now waits for it (up to 60 s)
        box["session"].cancel("operator cancelled while waiting")
        waited.set()

    run = migrate(src, dst, SessionConfig(ack_timeout_s=60.0),
                  on_source=lambda s: box.setdefault("session", s),
                  wrap_dest=lambda c: DestLink(c, drop_pass_acks=True,
                                               on_drop=cancel_when_dropped))
    assert waited.is_set()
    assert_rolled_back(src, dst, run, before)
    assert run.source.result == "cancelled"
    assert "operator cancelled while waiting" in run.source.reason
    # the cancel ended the wait, not the 60 s ack timeout (that would fail the migration,
    # naming the pass)
    assert "did not acknowledge" not in run.source.reason
