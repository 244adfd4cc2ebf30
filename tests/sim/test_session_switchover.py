"""The confirmed switchover between two sessions (docs/architecture.md §1.7;
docs/protocol.md §8.4): PREPARED, a journaled COMMIT that answers the connection's
challenge, and what each end does when a message after the commit point is lost. The
rule every test checks: never two ends running the guest, and an end that cannot know
the outcome keeps the guest paused with everything it needs to resume."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tests.support.session_rig import (
    MiB,
    Side,
    SideContainer,
    assert_migrated,
    assert_rolled_back,
    migrate,
    side_pairs,
    spec,
)
from vfiod.abi.vfio import MigState
from vfiod.errors import VfiodError
from vfiod.migration.session.common import SessionConfig
from vfiod.migration.session.dest import DestinationSession
from vfiod.migration.states import GuestState, MigrationState
from vfiod.migration.transport import Listener, connect
from vfiod.migration.transport.control import AckStage, ControlMessage, ControlType
from vfiod.vfio import RamRegion

RAM = (RamRegion("ram", 0, 16 * MiB),)
PLANS = [SideContainer([spec("v2_precopy_log")])]
#: the ends give up waiting for a lost message after this long
QUICK = SessionConfig(ack_timeout_s=1.5)


@pytest.fixture
def sides(tmp_path: Path):
    with side_pairs(tmp_path, PLANS, RAM) as make:
        yield make


class Journal:
    """Records the switchover calls of both ends in one list, in order; ``fail`` makes
    one of them raise, as a full disk would."""

    def __init__(self, log: list[str], side: str, fail: str = "") -> None:
        self.log, self.side, self.fail = log, side, fail

    def _write(self, what: str, mid: str) -> None:
        if what == self.fail:
            raise VfiodError(f"journal: cannot write {what}: No space left on device")
        self.log.append(f"{self.side} {what}")

    def committing(self, mid: str) -> None:
        self._write("committing", mid)

    def prepared(self, mid: str) -> None:
        self._write("prepared", mid)

    def resuming(self, mid: str) -> None:
        self._write("resuming", mid)

    def discarding(self, mid: str) -> None:
        self._write("discarding", mid)

    def switchover_write_s(self) -> float:
        return 0.0


def journals(log: list[str], src_fail: str = "", dst_fail: str = "") -> tuple[Any, Any]:
    return Journal(log, "source", src_fail), Journal(log, "destination", dst_fail)


class DropsControl:
    """One end's link that loses the control frames ``drop`` picks (the network ate
    them); everything else passes through."""

    def __init__(self, conn: Any, drop: Any) -> None:
        self.conn, self.drop = conn, drop

    def send_control(self, msg: ControlMessage) -> None:
        if not self.drop(msg):
            self.conn.send_control(msg)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def paused_with_state(side: Side) -> None:
    """The source's guest is paused and its devices still hold their stopped state."""
    assert side.guest.run_state is GuestState.FINISH_MIGRATE
    assert set(side.kernel_states().values()) == {MigState.STOP_COPY}


def test_the_order_of_the_records(sides) -> None:
    """Prepared before the source commits, the commit before the destination resumes."""
    src, dst = sides(fill_bytes=2 * MiB)
    log: list[str] = []
    run = migrate(src, dst, journals=journals(log))
    assert_migrated(src, dst, run)
    assert log == ["destination prepared", "source committing", "destination resuming"]


def test_a_lost_resumed_ack_leaves_the_source_paused_not_rolled_back(sides) -> None:
    """The finding: ACK resumed never arrives. The destination runs the guest; the source
    must not resume it too. It stays paused with its device state until it is told."""
    src, dst = sides(fill_bytes=2 * MiB)
    run = migrate(src, dst, QUICK, wrap_dest=lambda c: DropsControl(
        c, lambda m: m.stage is AckStage.RESUMED))
    assert run.dest is not None and run.dest.result == "completed"
    assert dst.guest.run_state is GuestState.RUNNING
    r = run.source
    assert r.result == "unsettled" and r.state == "UNSETTLED", r.reason
    assert "outcome unknown after the commit" in r.reason
    assert any("stays paused here" in w for w in r.warnings)
    paused_with_state(src)
    s = run.session
    assert s is not None and not s.cancel("operator")       # no cancel after the commit
    done = s.settle(True, "the destination's journal says resumed")
    assert done.result == "completed"
    assert src.guest.run_state is GuestState.POSTMIGRATE and src.kernel.open_files() == {}


def test_a_lost_commit_leaves_both_ends_paused_then_settles_on_the_source(sides) -> None:
    """COMMIT lost on the wire: the destination never resumes on its own; both wait.
    Told that the source committed, the destination resumes; told that the destination
    resumed, the source finishes."""
    src, dst = sides(fill_bytes=2 * MiB)
    before = src.ram_digest()
    run = migrate(src, dst, QUICK, wrap_source=lambda c: DropsControl(
        c, lambda m: m.kind is ControlType.COMMIT))
    assert run.source.result == "unsettled" and run.dest is not None
    assert run.dest.result == "unsettled" and "after PREPARED" in run.dest.reason
    assert dst.guest.run_state is not GuestState.RUNNING
    assert set(dst.kernel_states().values()) == {MigState.STOP}     # loaded, waiting
    paused_with_state(src)
    d, s = run.dest_session, run.session
    assert d is not None and s is not None
    assert not d.cancel("operator")                  # prepared: no discard on its own
    assert d.settle(True, "the source's journal says committed").result == "completed"
    assert dst.guest.run_state is GuestState.RUNNING
    assert set(dst.kernel_states().values()) == {MigState.RUNNING}
    assert s.settle(True, "resumed there").result == "completed"
    assert dst.ram_digest() == before


def test_a_lost_commit_settled_the_other_way_resumes_the_source(sides) -> None:
    src, dst = sides(fill_bytes=2 * MiB)
    before, dst_before = src.ram_digest(), dst.ram_digest()
    run = migrate(src, dst, QUICK, wrap_source=lambda c: DropsControl(
        c, lambda m: m.kind is ControlType.COMMIT))
    d, s = run.dest_session, run.session
    assert d is not None and s is not None
    run.dest = d.settle(False, "the source never committed")
    run.source = s.settle(False, "the destination discarded it")
    assert "rolled back" in run.source.reason and "discarded" in run.dest.reason
    assert_rolled_back(src, dst, run, before, dst_before)


def test_a_commit_that_does_not_answer_the_challenge_is_ignored(sides) -> None:
    src, dst = sides(fill_bytes=1 * MiB)

    class Forged(DropsControl):
        def send_control(self, msg: ControlMessage) -> None:
            if msg.kind is ControlType.COMMIT:
                msg = ControlMessage.commit(msg.fields["migration_id"], "0" * 32)
            self.conn.send_control(msg)

    run = migrate(src, dst, QUICK, wrap_source=lambda c: Forged(c, None))
    assert run.dest is not None and run.dest.result == "unsettled"
    assert "challenge" in run.dest.reason
    assert dst.guest.run_state is not GuestState.RUNNING
    assert run.source.result == "unsettled"


@pytest.mark.parametrize("where", ["source", "destination"])
def test_a_journal_that_cannot_be_written_before_the_commit_rolls_back(sides,
                                                                      where: str) -> None:
    """No record, no promise: a full disk at the source's commit record or at the
    destination's prepared record fails the migration; both ends roll back."""
    src, dst = sides(fill_bytes=2 * MiB)
    before = src.ram_digest()
    log: list[str] = []
    j = (journals(log, src_fail="committing") if where == "source"
         else journals(log, dst_fail="prepared"))
    run = migrate(src, dst, QUICK, journals=j)
    assert "No space left on device" in run.source.reason
    assert_rolled_back(src, dst, run, before)
    assert "destination resuming" not in log


def test_a_destination_that_cannot_resume_after_the_commit_gives_it_back(
        sides, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device refuses to resume after COMMIT: the destination journals "discarding"
    before it says so, then the source resumes with its own state: one owner."""
    src, dst = sides(fill_bytes=2 * MiB)
    before = src.ram_digest()
    drv = dst.guest.devices[0].driver

    def refuse() -> None:
        raise VfiodError("the device would not run")
    monkeypatch.setattr(drv, "resume", refuse)
    log: list[str] = []
    run = migrate(src, dst, QUICK, journals=journals(log))
    assert log[-2:] == ["destination resuming", "destination discarding"]
    assert run.source.result == "failed" and "discarded it after the commit" in \
        run.source.reason
    assert_rolled_back(src, dst, run, before)


def test_a_recorded_stream_replayed_on_a_new_connection_is_refused(sides) -> None:
    """The finding: a stream recorded on the wire and sent again was loaded as a new
    migration. Its HEADER answers the old connection's challenge: refused, nothing
    written."""
    src, dst = sides(fill_bytes=1 * MiB)
    recorded = bytearray()

    class Tee(DropsControl):
        def send_buffers(self, bufs: Any) -> Any:
            for b in bufs:
                recorded.extend(bytes(b))
            return self.conn.send_buffers(bufs)

    first = migrate(src, dst, wrap_source=lambda c: Tee(c, lambda m: False))
    assert first.source.result == "completed"
    dst.guest.set_run_state(GuestState.INMIGRATE)
    box: dict[str, Any] = {}
    with Listener("127.0.0.1", 0) as lst:
        def serve() -> None:
            with lst.accept(timeout=30) as conn:
                box["r"] = DestinationSession(dst.guest, conn, host=dst.facts,
                                              config=QUICK).run()
        t = threading.Thread(target=serve)
        t.start()
        with connect("127.0.0.1", lst.address[1]) as conn:
            conn.wait_ack(AckStage.HELLO, 10)
            try:
                conn.send_buffers([bytes(recorded)])
            except OSError:
                pass                      # refused and closed while we were still sending
        t.join(30)
    r = box["r"]
    assert r.result == "failed" and "challenge" in r.reason
    assert "manifest" not in r.verification          # refused at the HEADER
    assert r.state == MigrationState.FAILED.name
