"""Switchover policy and cancel (docs/architecture.md §1 steps 5-6, §4): a dirty rate the link never
catches up with (cancel on timeout, or force by policy), the iteration limit, and cancel
by the operator or by the destination at several points. A cancelled attempt rolls back:
source devices RUNNING, tracking stopped, guest memory written only by the guest itself
(checked by replaying its deterministic workload), the destination discards."""

from __future__ import annotations

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
    replay_digest,
    side_pairs,
    spec,
)
from vfiod.kernel.sim.workload import DmaTarget
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import SessionConfig
from vfiod.migration.session.link import ThrottledLink
from vfiod.migration.session.status import IterationProgress
from vfiod.migration.states import MigrationState
from vfiod.vfio import RamRegion

RAM = (RamRegion("ram", 0, 16 * MiB),)
DEV = spec("v2_precopy_log")
PLANS = [SideContainer([DEV])]


@pytest.fixture
def sides(tmp_path: Path):
    with side_pairs(tmp_path, PLANS, RAM) as make:
        yield make


def busy(src: Side, rate: float) -> Any:
    """A workload that dirties a 4 MiB window faster than the capped link drains it."""
    wl = add_workload(src, [DmaTarget(DEV.name, 0, 4 * MiB)], dirty_rate_bps=rate,
                      hot_fraction=1.0, seed=9)
    wl.start()
    wl.wait_for_writes(2)
    return wl


def test_never_converges_cancel_on_timeout(sides, tmp_path: Path) -> None:
    src, dst = sides(fill_bytes=1 * MiB)
    wl = busy(src, 8e6)
    cfg = SessionConfig(policy=Policy(timeout_s=1.0, on_timeout="cancel"))
    run = migrate(src, dst, cfg, rate_bps=2e6)
    wl.pause()
    r = run.source
    assert r.result == "cancelled" and r.state == "CANCELLED"
    assert "timeout 1 s reached" in r.reason
    assert r.history[-1].decision == "cancel"
    assert all(p.predicted_downtime_s > 0.3 for p in r.history)
    ram = replay_digest(tmp_path / "replay", PLANS, wl, ram=RAM, fill_bytes=1 * MiB)
    assert_rolled_back(src, dst, run, ram)
    wl.resume()                         # the guest runs on: its devices still DMA
    wl.wait_for_writes(wl.writes + 2)


def test_never_converges_force_by_policy(sides) -> None:
    src, dst = sides(fill_bytes=1 * MiB)
    wl = busy(src, 8e6)
    cfg = SessionConfig(policy=Policy(timeout_s=1.0, on_timeout="force"))
    run = migrate(src, dst, cfg, rate_bps=2e6)
    assert run.source.history[-1].decision == "force"
    assert run.source.predicted_downtime_s > 0.3
    assert wl.paused and wl.error is None
    assert_migrated(src, dst, run)


def test_max_iterations_cancel(sides) -> None:
    src, dst = sides(fill_bytes=1 * MiB)
    before = src.ram_digest()
    cfg = SessionConfig(policy=Policy(downtime_limit_s=1e-9, max_iterations=2))
    run = migrate(src, dst, cfg)
    assert run.source.result == "cancelled" and run.source.iterations == 2
    assert "2 iterations reached" in run.source.reason
    assert_rolled_back(src, dst, run, before)


def test_operator_cancel_in_the_middle_of_precopy(sides, tmp_path: Path) -> None:
    src, dst = sides(fill_bytes=1 * MiB)
    wl = busy(src, 2e6)
    cfg = SessionConfig(policy=Policy(downtime_limit_s=1e-9))
    box: dict[str, Any] = {}

    def on_source(s: Any) -> None:
        box["s"] = s

    def progress(p: IterationProgress) -> None:
        if p.iteration == 2:
            assert box["s"].cancel("operator: maintenance window closed")

    run = migrate(src, dst, cfg, on_source=on_source, progress=progress)
    wl.pause()
    assert run.source.result == "cancelled" and run.source.iterations == 2
    assert "maintenance window closed" in run.source.reason
    assert run.dest is not None and run.dest.result == "cancelled"      # ABORT received
    ram = replay_digest(tmp_path / "replay", PLANS, wl, ram=RAM, fill_bytes=1 * MiB)
    assert_rolled_back(src, dst, run, ram)


class CancelAfter(ThrottledLink):
    """Cancels the session once ``after`` stream bytes went out: mid-pass, between two
    slices of the first RAM pass."""

    def __init__(self, link: Any, after: int) -> None:
        super().__init__(link, 1e12)
        self.after = after
        self.session: Any = None

    def send_buffers(self, buffers: Any) -> None:
        super().send_buffers(buffers)
        if self.bytes_sent >= self.after and self.session is not None:
            self.session.cancel("operator cancel during the first pass")


def test_cancel_during_the_first_ram_pass(sides, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = sides(fill_bytes=6 * MiB)
    before = src.ram_digest()
    links: list[CancelAfter] = []
    import tests.support.session_rig as rig

    real = rig.connect

    def connect(*a: Any, **k: Any) -> Any:
        link = CancelAfter(real(*a, **k), after=2 * MiB)
        links.append(link)
        return link

    monkeypatch.setattr(rig, "connect", connect)
    cfg = SessionConfig(slice_bytes=1 * MiB)
    run = migrate(src, dst, cfg, on_source=lambda s: setattr(links[0], "session", s))
    r = run.source
    assert r.result == "cancelled" and r.history == []      # never finished pass 1
    assert 2 * MiB <= r.ram_bytes_sent < 6 * MiB
    assert_rolled_back(src, dst, run, before)


def test_cancel_just_before_stop_and_copy(sides) -> None:
    src, dst = sides(fill_bytes=1 * MiB)
    before = src.ram_digest()

    def on_source(s: Any) -> None:
        def at(old: MigrationState, new: MigrationState) -> None:
            if new is MigrationState.DEVICE:
                assert s.cancel("last-second cancel")
        s.add_state_handler(at)

    run = migrate(src, dst, on_source=on_source)
    assert run.source.result == "cancelled"
    assert_rolled_back(src, dst, run, before)
    # the guest was never paused: no FINISH_MIGRATE in the source's run states
    assert run.source.actual_downtime_s is None


def test_cancel_after_commit_is_refused(sides) -> None:
    src, dst = sides(fill_bytes=1 * MiB)
    answers: list[bool] = []

    def on_source(s: Any) -> None:
        s.add_state_handler(lambda old, new: answers.append(s.cancel("too late"))
                            if new is MigrationState.COMPLETED else None)

    run = migrate(src, dst, on_source=on_source)
    assert answers == [False]
    assert_migrated(src, dst, run)


def test_destination_cancels(sides, monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination's operator cancels mid pre-copy: it sends CANCEL on the return
    path, discards, and the source rolls back."""
    src, dst = sides(fill_bytes=1 * MiB)
    before = src.ram_digest()
    cfg = SessionConfig(policy=Policy(downtime_limit_s=1e-9, max_iterations=500))
    box: dict[str, Any] = {}

    def progress(p: IterationProgress) -> None:
        if p.iteration == 2:     # acted on at the next record the destination reads
            assert box["dest"].cancel("destination operator cancelled")

    import tests.support.session_rig as rig
    real = rig.DestinationSession

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            box["dest"] = self

    monkeypatch.setattr(rig, "DestinationSession", Spy)
    run = migrate(src, dst, cfg, progress=progress)
    assert run.source.result == "cancelled" and 2 <= run.source.iterations < 500
    assert "peer cancelled" in run.source.reason
    assert run.dest is not None and run.dest.result == "cancelled"
    assert_rolled_back(src, dst, run, before)

class DiesAfter:
    """The destination's end of the connection, which goes away (process killed) after
    ``after`` bytes: the source sees the connection reset, the destination a truncated
    stream."""

    def __init__(self, conn: Any, after: int) -> None:
        self.conn, self.after, self.got = conn, after, 0

    def recv_into(self, view: memoryview) -> int:
        if self.got >= self.after:
            self.conn.close()
            return 0
        n = self.conn.recv_into(view[:max(1, self.after - self.got)])
        self.got += n
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_connection_lost_mid_stream(sides) -> None:
    src, dst = sides(fill_bytes=4 * MiB)
    before = src.ram_digest()
    run = migrate(src, dst, SessionConfig(ack_timeout_s=10),
                  wrap_dest=lambda conn: DiesAfter(conn, 1 * MiB))
    assert run.source.result == "failed"
    assert "closed" in run.source.reason or "reset" in run.source.reason
    assert run.dest is not None and run.dest.result == "failed"
    assert "the stream ended" in run.dest.reason
    assert_rolled_back(src, dst, run, before)


def test_a_second_attempt_after_a_cancelled_one_completes(sides) -> None:
    """Nothing half-done remains: the same guests migrate fine right after a cancel (the
    destination zeroed what it received, the source's devices and tracking restart)."""
    src, dst = sides(fill_bytes=2 * MiB)
    before = src.ram_digest()
    first = migrate(src, dst, SessionConfig(policy=Policy(downtime_limit_s=1e-9,
                                                          max_iterations=2)))
    assert first.source.result == "cancelled"
    assert first.dest is not None and first.dest.verification["discarded_pages"] > 0
    assert_rolled_back(src, dst, first, before)
    second = migrate(src, dst)
    assert_migrated(src, dst, second)
