"""RAM_RUNS records are negotiated (docs/protocol.md §5.4): the source's HEADER offers
them only when the destination's HELLO did, so a source upgraded first still migrates to
a destination that does not know them; a whole migration with them verifies."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tests.support.session_rig import (
    MiB,
    Side,
    SideContainer,
    add_workload,
    assert_migrated,
    migrate,
    pair,
    spec,
)
from vfiod.kernel.sim.workload import DmaTarget
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.planning.preflight import MigrationFacts
from vfiod.migration.session.common import SessionConfig, guest_facts
from vfiod.migration.session.source import SourceSession
from vfiod.migration.states import MigState
from vfiod.migration.stream import RamRunsLoaded, StreamReader
from vfiod.migration.stream.header import StreamHeader
from vfiod.migration.transport import AckStage, ControlMessage, Listener, connect

DEV = spec("v2_precopy_log")


@pytest.fixture
def sides(tmp_path: Path) -> Any:
    made: list[Side] = []

    def make(**kw: Any) -> tuple[Side, Side]:
        src, dst = pair(tmp_path, [SideContainer([DEV])], **kw)
        made.extend((src, dst))
        return src, dst
    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("offered", [True, False])
def test_the_header_offers_ram_runs_only_when_the_destination_did(sides, offered: bool) -> None:
    """A destination that reads the HEADER and hangs up: the HEADER says ``ram_runs``
    exactly when its HELLO offered them (an older destination's HELLO has no such field);
    the source then rolls back."""
    src, dst = sides(fill_bytes=1 * MiB)
    facts = MigrationFacts(dst.facts, guest_facts(dst.guest))
    got: dict[str, StreamHeader] = {}
    with Listener("127.0.0.1", 0) as lst:
        def destination() -> None:
            with lst.accept(timeout=30) as conn:
                conn.send_control(ControlMessage.ack(
                    AckStage.HELLO, facts=facts.to_json(), challenge="c", pass_acks=True,
                    **({"ram_runs": True} if offered else {})))
                got["header"] = StreamReader(conn).read_header()
        t = threading.Thread(target=destination)
        t.start()
        with connect("127.0.0.1", lst.address[1]) as conn:
            r = SourceSession(src.guest, conn, host=src.facts,
                              config=SessionConfig(ack_timeout_s=10)).run()
        t.join(30)
    assert got["header"].ram_runs is offered
    assert r.result == "failed"
    assert set(src.kernel_states().values()) == {MigState.RUNNING}


def test_a_migration_of_scattered_pages_uses_ram_runs_and_verifies(sides,
                                                                   monkeypatch) -> None:
    """A workload writing scattered pages: the final pass travels in RAM_RUNS records,
    and the destination's memory and digests equal the source's."""
    src, dst = sides(fill_bytes=8 * MiB)
    wl = add_workload(src, [DmaTarget(DEV.name, 0, 8 * MiB)], dirty_rate_bps=8e6,
                      hot_fraction=1.0, seed=5)
    wl.start()
    wl.wait_for_writes(64)
    seen: list[RamRunsLoaded] = []
    events = StreamReader.events

    def watch(self: StreamReader) -> Any:
        for ev in events(self):
            if isinstance(ev, RamRunsLoaded):
                seen.append(ev)
            yield ev

    monkeypatch.setattr(StreamReader, "events", watch)
    run = migrate(src, dst, SessionConfig(policy=Policy(downtime_limit_s=1e-6,
                                                        max_iterations=2,
                                                        on_timeout="force")))
    assert_migrated(src, dst, run)
    assert seen and sum(len(ev.runs) for ev in seen) > len(seen)
