"""A migration coordinated with the VMM's own (docs/architecture.md §8.3): the VMM moves
all of RAM and what its vCPUs wrote, vfiod the device state and what the devices wrote,
and the destination ends with exactly the source's RAM at the pause. The VMM here is
tests/support/fake_vmm.py, which delivers its first pass as late and as stale as a VMM
can; tests/qemu/ runs the same with real QEMU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.fake_vmm import FakeVmm
from tests.support.session_rig import (
    MiB,
    SideContainer,
    add_workload,
    assert_migrated,
    migrate,
    side_pairs,
    spec,
)
from vfiod.abi.vfio import MigState
from vfiod.kernel.sim.workload import DmaTarget
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import SessionConfig
from vfiod.migration.session.vmm_source import VMM_FIXED_S
from vfiod.migration.states import GuestState
from vfiod.vfio import RamRegion

RAM = (RamRegion("ram", 0, 16 * MiB),)
DEV = spec("v2_precopy_log")
PLANS = [SideContainer([DEV])]
PAGE = 4096
#: the vCPUs write pages 512..1535: half of them inside the devices' 4 MiB target
VCPU_PAGES = list(range(512, 1536))
QUICK = SessionConfig(ack_timeout_s=5.0)


@pytest.fixture
def sides(tmp_path: Path):
    VMM_FIXED_S.clear()                 # what earlier tests' migrations taught
    with side_pairs(tmp_path, PLANS, RAM) as make:
        yield make
    VMM_FIXED_S.clear()


def _writing(src):  # noqa: ANN001, ANN202 - a Side
    wl = add_workload(src, [DmaTarget(DEV.name, 0, 4 * MiB)], dirty_rate_bps=8e6, seed=11)
    wl.start()
    return wl


def test_device_pages_land_after_the_vmms_copy_and_both_halves_arrive(sides) -> None:
    src, dst = sides(fill_bytes=6 * MiB)
    wl = _writing(src)
    with FakeVmm(src.guest, dst.guest, VCPU_PAGES, switch_after=400) as vmm:
        run = migrate(src, dst, QUICK, vmm=(vmm, vmm))
        first_pass = vmm._first_pass
        vmm.close()
    assert wl.writes > 0 and wl.error is None
    assert_migrated(src, dst, run)          # full RAM digests equal, devices RUNNING there
    # the VMM's copy of the devices' pages was stale: only vfiod's pages made them right
    (block,) = src.guest.ram
    now = np.frombuffer(block.view(), dtype=np.uint8)[:4 * MiB]
    assert first_pass is not None and (first_pass[:4 * MiB] != now).any()
    # vfiod sent only what the devices wrote, never the RAM the VMM moves
    assert 0 < run.source.ram_bytes_sent <= 4 * MiB
    assert vmm.uri == FakeVmm.incoming and vmm.vcpu_writes == 400
    assert vmm.calls.count("continue") == 1 and "abandon" not in vmm.calls
    assert vmm.calls[-1] == "completed"
    d = run.dest
    assert d is not None and d.timings["vmm_incoming_wait_s"] >= 0
    assert d.verification["vmm_applied_pages"] * PAGE == run.source.ram_bytes_sent
    split = run.source.vmm
    # the VMM's own time: what it had left at its rate (no fixed cost known before)
    left = split["progress"]["remaining_bytes"]
    assert split["predicted"]["vmm_own_s"] == pytest.approx(left / vmm.bandwidth_bps)
    assert split["actual"]["vmm_s"] + split["actual"]["devices_s"] == pytest.approx(
        run.source.actual_downtime_s)
    assert run.source.predicted_downtime_s == pytest.approx(
        split["predicted"]["devices_s"] + split["predicted"]["vmm_s"])
    # its reported downtime less that transfer is its fixed cost, for the next migration
    assert VMM_FIXED_S[src.guest.name] == pytest.approx(0.003 - left / vmm.bandwidth_bps)


def test_the_vmms_migration_failing_before_its_switchover_rolls_back(sides) -> None:
    src, dst = sides()
    _writing(src)
    with FakeVmm(src.guest, dst.guest, VCPU_PAGES, fail="source") as vmm:
        run = migrate(src, dst, QUICK, vmm=(vmm, vmm))
    r = run.source
    assert r.result == "failed" and "QEMU's own migration ended failed" in r.reason
    assert set(src.kernel_states().values()) == {MigState.RUNNING}
    assert src.guest.run_state is GuestState.RUNNING
    assert "continue" not in vmm.calls and "abandon" in vmm.calls
    assert run.dest is not None and run.dest.result in ("failed", "cancelled")
    assert dst.guest.run_state is not GuestState.RUNNING
    assert set(dst.kernel_states().values()) == {MigState.RUNNING}   # reset, nothing loaded


def test_an_incoming_vmm_that_fails_after_the_continue_rolls_the_source_back(sides) -> None:
    src, dst = sides()
    _writing(src)
    with FakeVmm(src.guest, dst.guest, VCPU_PAGES, fail="incoming") as vmm:
        run = migrate(src, dst, QUICK, vmm=(vmm, vmm))
    r, d = run.source, run.dest
    assert d is not None and d.result == "failed" and "incoming migration failed" in d.reason
    assert r.result == "failed" and not run.session.committed   # never committed
    assert vmm.calls.index("continue") < vmm.calls.index("abandon")
    assert set(src.kernel_states().values()) == {MigState.RUNNING}
    assert src.guest.run_state is GuestState.RUNNING            # resumed here: one owner
    assert dst.guest.run_state is not GuestState.RUNNING


@pytest.mark.parametrize("configured", ["source", "destination"])
def test_only_one_end_coordinated_with_its_vmm_is_refused_naming_it(sides,
                                                                    configured: str) -> None:
    src, dst = sides()
    with FakeVmm(src.guest, dst.guest, VCPU_PAGES) as vmm:
        pair = (vmm, None) if configured == "source" else (None, vmm)
        run = migrate(src, dst, QUICK, vmm=pair)
    r = run.source
    assert r.result == "failed"
    reasons = " ".join(r.verification["preflight"])
    assert "[guest.qemu]" in reasons
    assert ("the destination's is not" if configured == "source"
            else "this one is not") in reasons
    assert vmm.calls == []                      # refused before the VMM was asked anything
    assert src.guest.run_state is GuestState.RUNNING


def test_the_vmm_decides_when_to_switch_not_vfiods_convergence_watch(sides) -> None:
    """Pre-copy sends no RAM while the VMM migrates, so vfiod's remaining bytes only grow:
    its own convergence watch would give up at once with this policy. The VMM's
    pre-switchover stop decides instead, and the migration completes."""
    src, dst = sides()
    _writing(src)
    impatient = SessionConfig(ack_timeout_s=5.0, policy=Policy(
        downtime_limit_s=1e-6, stall_iterations=1, not_converging_iterations=1,
        not_converging_min_s=0.0))
    with FakeVmm(src.guest, dst.guest, VCPU_PAGES, switch_after=800) as vmm:
        run = migrate(src, dst, impatient, vmm=(vmm, vmm))
        vmm.close()
    assert_migrated(src, dst, run)
    assert run.source.iterations >= 2
