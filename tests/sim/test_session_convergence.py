"""No migration runs forever, without a timeout or an iteration cap (docs/architecture.md §4):
pre-copy that stops shrinking the remaining bytes, or that the predictor says cannot
converge, ends by the policy's default (cancel: the guest keeps running at the source)
with the reason named. And a one-off cost at setup (first-call JIT) is not taken as the
fixed cost of every later prediction."""

from __future__ import annotations

import re
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
    pair,
    spec,
)
from vfiod.kernel.sim.workload import DmaTarget
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import SessionConfig
from vfiod.migration.session.source import SourceSession
from vfiod.migration.states import GuestState, MigState
from vfiod.vfio import RamRegion

CAP = 32 * MiB                      # bytes per second, the capped link


@pytest.fixture
def sides(tmp_path: Path):
    made: list[Side] = []

    def make(plans: list[SideContainer], ram_mib: int, **kw: Any) -> tuple[Side, Side]:
        s, d = pair(tmp_path, plans, ram=(RamRegion("ram", 0, ram_mib * MiB),), **kw)
        made.extend((s, d))
        return s, d
    yield make
    for side in made:
        side.close()


def test_64_mib_guest_behind_a_32_mib_link_that_stops_shrinking_is_cancelled(sides) -> None:
    """A 16 MiB window dirtied faster than the link drains it: the remaining bytes stay
    near 16 MiB (500 ms at the cap), above the limit at every pass."""
    dev = spec("v2_precopy_log")
    src, dst = sides([SideContainer([dev])], 64, fill_bytes=4 * MiB)
    wl = add_workload(src, [DmaTarget(dev.name, 0, 16 * MiB)], dirty_rate_bps=96e6,
                      hot_fraction=1.0, seed=3)
    wl.start()
    wl.wait_for_writes(2)
    # the windows shortened so the test runs in seconds; no timeout, no iteration cap
    cfg = SessionConfig(policy=Policy(stall_iterations=4, not_converging_iterations=4,
                                      not_converging_min_s=0))
    run = migrate(src, dst, cfg, rate_bps=CAP)
    wl.pause()
    r = run.source
    assert r.result == "cancelled" and r.history[-1].decision == "cancel"
    assert r.reason.startswith("cancelled by policy: not converging"), r.reason
    assert r.reason.endswith("> limit 300 ms"), r.reason
    assert r.iterations <= 8
    assert run.dest is not None and run.dest.result == "cancelled"
    wl.resume()                         # the guest runs on at the source
    wl.wait_for_writes(wl.writes + 2)


def test_opted_out_device_in_a_shared_container_ends_by_the_default_policy(sides) -> None:
    """The opt-out in the container that maps all RAM, its device rewriting a 16 MiB
    window faster than the link drains it: pre-copy cannot ask what it wrote, the
    source's sample of the mapping (``optout_sample``) finds almost all of it changed at
    every pass, and at the measured 32 MiB/s that is about 500 ms > 300 ms. The default
    policy (no timeout, no cap; only its 30 s minimum shortened) cancels after 20 passes
    and says why. (An idle opted-out device now converges: the sample finds nothing.)"""
    other, opt = spec("v2_precopy_log"), spec("v2_stop_copy_log")
    src, dst = sides([SideContainer([other, opt], opt_out=[opt.name])], 16,
                     fill_bytes=8 * MiB)
    wl = add_workload(src, [DmaTarget(opt.name, 0, 16 * MiB)], dirty_rate_bps=96e6,
                      hot_fraction=1.0, seed=3)
    wl.start()
    wl.wait_for_writes(2)
    run = migrate(src, dst, SessionConfig(policy=Policy(not_converging_min_s=0)),
                  rate_bps=CAP)
    wl.pause()
    r = run.source
    assert r.result == "cancelled"
    assert re.match(
        r"cancelled by policy: not converging: remaining bytes stopped shrinking for 20 "
        r"iterations \(best \d+(\.\d+)? MiB, now 1\d(\.\d+)? MiB\): ", r.reason), r.reason
    assert "count dirty at every pass (a device's pre-copy dirty tracking is off" in r.reason
    assert r.reason.endswith("> limit 300 ms")
    assert r.iterations == 21
    # rolled back (the device wrote the RAM throughout, so its content is not compared)
    assert set(src.kernel_states().values()) == {MigState.RUNNING}
    assert src.guest.run_state is GuestState.RUNNING
    assert src.mig_fds() == [] and dst.mig_fds() == []
    assert run.dest is not None and run.dest.result == "cancelled"
    assert dst.models() == dst.initial_models


def test_no_dirty_tracking_ends_on_the_predictors_own_verdict(sides) -> None:
    src, dst = sides([SideContainer([spec("v2_precopy")])], 16, fill_bytes=8 * MiB)
    before = src.ram_digest()
    cfg = SessionConfig(policy=Policy(not_converging_iterations=3, stall_iterations=50,
                                      not_converging_min_s=0))
    run = migrate(src, dst, cfg, rate_bps=CAP)
    r = run.source
    assert r.result == "cancelled"
    assert r.reason.startswith(
        "cancelled by policy: not converging for 3 iterations: no dirty tracking"), r.reason
    assert all(not p.will_converge for p in r.history)
    assert_rolled_back(src, dst, run, before)


def test_a_one_off_setup_cost_is_not_every_predictions_fixed_cost(sides) -> None:
    """The injected clock jumps 1 s inside the first device call at setup (first-call JIT);
    the guest is idle, so after pass 1 nothing is left to send: the prediction must fall
    under the 300 ms limit and the migration switch over."""
    dev = spec("v2_precopy_log")
    src, dst = sides([SideContainer([dev])], 64, fill_bytes=1 * MiB)
    jit = {"s": 0.0}

    def inject(s: SourceSession) -> None:
        real_clock = s.clock
        s.clock = lambda: real_clock() + jit["s"]
        drv = s.guest.devices[0].driver
        real_setup = drv.save_setup

        def save_setup() -> Any:
            jit["s"] += 1.0             # one second of compilation, once
            return real_setup()
        drv.save_setup = save_setup     # type: ignore[method-assign]

    cfg = SessionConfig(policy=Policy(max_iterations=5))
    run = migrate(src, dst, cfg, on_source=inject)
    assert jit["s"] == 1.0
    assert run.source.result == "completed", run.source.reason
    assert run.source.history[-1].decision == "switchover"
    assert run.source.history[-1].predicted_downtime_s < 0.3
    assert_migrated(src, dst, run)
