"""The pre-copy dirty-tracking opt-out through the tracker on the simulated kernel
(docs/architecture.md §3, QEMU's x-pre-copy-dirty-page-tracking=off): while an opted-out device of a
container is RUNNING or PRE_COPY its bitmap is not queried and its whole mapped range
counts dirty; the stop-and-copy sync queries it and every page the device wrote is sent."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.support.dirty_rig import GUEST_PAGE, Rig, dev
from vfiod.abi.vfio import MigState
from vfiod.dirty.tracker import DirtyTracker
from vfiod.vfio import RamRegion

A = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"     # opted out, container c0
B = "7c9e6679-7425-40de-944b-e07fc1f90ae7"     # tracking on, container c1
G = GUEST_PAGE


@pytest.fixture
def rig(tmp_path: Path):  # noqa: ANN201
    r = Rig(tmp_path, [[dev(A, kind="mdev")], [dev(B, kind="mdev")]])
    r.type1("c0", [10])
    r.type1("c1", [11])
    r.map("c0", 0x100000, 37 * G, 20 * G)          # guest pages 37..56
    r.map("c1", 0x100000, 70 * G, 10 * G)          # guest pages 70..79
    r.containers["c0"].opt[A] = False
    yield r
    r.close()


def _gets(rig: Rig, since: int) -> list[str]:
    return [e for e in rig.kernel.faults.log[since:] if e.startswith("ioctl:VFIO_IOMMU_DIRTY")]


def test_opted_out_container_is_not_queried_but_nothing_is_lost(rig: Rig) -> None:
    states = {A: MigState.RUNNING, B: MigState.RUNNING}
    c = itertools.count(1)
    tr = DirtyTracker([RamRegion("ram", 0, 128 * G)],
                      [rig.containers["c0"].tracked(), rig.containers["c1"].tracked()],
                      device_states=states, clock=lambda: float(next(c)))
    tr.start()
    try:
        rig.sent(tr.take_dirty_runs(1 << 20))               # first full pass
        st = tr.status().containers[0]
        assert st.opt_out_devices == (A,) and st.opt_out_active is True

        for phase_state in (MigState.RUNNING, MigState.PRE_COPY):
            states[A] = states[B] = phase_state
            rig.write(A, "c0", 0x100000 + 3 * G, 1)          # guest page 40
            rig.write(B, "c1", 0x100000 + 2 * G, 1)          # guest page 72
            log = len(rig.kernel.faults.log)
            res = tr.sync("precopy")
            # only c1 was asked (one GET_BITMAP), c0 counted whole
            assert len(_gets(rig, log)) == 1
            assert set(res.skipped) == {"c0"} and A in res.skipped["c0"]
            assert phase_state.name in res.skipped["c0"]
            # c0's 20 mapped pages are reported dirty (status, predictor) but are not
            # put in the bitmap: re-sending them each pass would only be undone later
            assert res.new_dirty_pages == 1 and res.assumed_dirty_pages == 20
            assert res.dirty_pages == 20 + 1 and res.assumed_dirty_bytes == 20 * 4096
            sent = rig.sent(tr.take_dirty_runs(1 << 20))
            assert sent == {72}

        # the device keeps writing while opted out, after the last pre-copy send
        rig.write(A, "c0", 0x100000 + 19 * G, 1)             # guest page 56
        rig.write(A, "c0", 0x100000 + 5 * G, 1)              # guest page 42
        # stop-and-copy: the devices stop; the final sync queries c0 and finds every
        # page written since tracking started (40 from pre-copy too: never read yet)
        states[A] = MigState.STOP_COPY
        states[B] = MigState.STOP
        log = len(rig.kernel.faults.log)
        res = tr.sync("stop-copy")
        assert len(_gets(rig, log)) == 2 and res.skipped == {}
        final = rig.sent(tr.take_dirty_runs(1 << 20))
        assert final == {40, 42, 56}
        assert not rig.written                               # every written page was sent
        assert tr.status().containers[0].opt_out_active is False
    finally:
        tr.stop()


@pytest.mark.parametrize("state, queried", [
    (MigState.RUNNING, False), (MigState.PRE_COPY, False), (MigState.RUNNING_P2P, True),
    (MigState.PRE_COPY_P2P, True), (MigState.STOP_COPY, True), (MigState.STOP, True),
    (None, False),
])
def test_which_states_block_the_query(rig: Rig, state: MigState | None, queried: bool) -> None:
    tr = DirtyTracker([RamRegion("ram", 0, 128 * G)], [rig.containers["c0"].tracked()],
                      device_states=lambda name: state)
    tr.start(initial_all_dirty=False)
    try:
        rig.write(A, "c0", 0x100000, 1)
        res = tr.sync()
        assert ("c0" not in res.skipped) == queried
        assert res.new_dirty_pages == (1 if queried else 0)
        assert res.assumed_dirty_pages == (0 if queried else 20)
        if state is None:
            assert "state unknown" in res.skipped["c0"]
    finally:
        tr.stop()


def test_device_without_optout_never_blocks(rig: Rig) -> None:
    tr = DirtyTracker([RamRegion("ram", 0, 128 * G)], [rig.containers["c1"].tracked()],
                      device_states={B: MigState.RUNNING})
    tr.start(initial_all_dirty=False)
    try:
        assert tr.sync().skipped == {}
        assert tr.status().containers[0].opt_out_devices == ()
    finally:
        tr.stop()
