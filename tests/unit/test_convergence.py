"""No migration runs forever, and a one-off cost is not a fixed cost (docs/architecture.md §4):
the convergence watch on the measured trend, the policy acting on it, and the robust
estimate of the devices' state arcs."""

from __future__ import annotations

import pytest

from vfiod.migration.planning.convergence import ConvergenceWatch, FixedCostSamples
from vfiod.migration.planning.predictor import (
    BandwidthEstimator,
    Decision,
    DowntimePredictor,
    FixedCosts,
    IterationInputs,
    Policy,
    Prediction,
)

MiB = 1 << 20


def at(remaining: int, downtime_s: float = 1.0, converge: bool = True,
       reason: str = "r") -> Prediction:
    return Prediction(0.0, downtime_s, remaining, 0, 32 * MiB, "test", None, 0.0, converge,
                      reason)


def test_remaining_bytes_that_stop_shrinking_are_named_after_the_window() -> None:
    w = ConvergenceWatch(stall_iterations=20, not_converging_iterations=10)
    reasons = [w.observe(at(64 * MiB)) for _ in range(21)]
    assert reasons[:20] == [None] * 20
    assert reasons[20] == ("not converging: remaining bytes stopped shrinking for 20 "
                           "iterations (best 64 MiB, now 64 MiB): r")


def test_steady_shrinking_never_stalls_and_noise_does_not_count_as_progress() -> None:
    w = ConvergenceWatch(stall_iterations=5, not_converging_iterations=10)
    rem = 64 * MiB
    for _ in range(40):                  # converging slowly: 15 % less every pass
        rem = int(rem * 0.85)
        assert w.observe(at(rem)) is None
    w = ConvergenceWatch(stall_iterations=5, not_converging_iterations=10)
    got = [w.observe(at(64 * MiB - i * 4096)) for i in range(6)]   # new minima, tiny ones
    assert got[-1] is not None and "for 5 iterations" in got[-1]


def test_will_converge_false_held_for_the_window_is_named() -> None:
    w = ConvergenceWatch(stall_iterations=100, not_converging_iterations=3)
    why = "dirty rate 40.0 MB/s >= bandwidth 33.6 MB/s: pre-copy cannot converge"
    assert w.observe(at(64 * MiB, converge=False, reason=why)) is None
    assert w.observe(at(32 * MiB)) is None                  # the streak is broken
    got = [w.observe(at(16 * MiB >> i, converge=False, reason=why)) for i in range(3)]
    assert got[:2] == [None, None]
    assert got[2] == f"not converging for 3 iterations: {why}"


def test_the_verdict_waits_for_the_minimum_time_by_the_predictions_clock() -> None:
    w = ConvergenceWatch(stall_iterations=2, not_converging_iterations=2, min_s=30.0)

    def p_at(t: float, converge: bool) -> Prediction:
        return Prediction(t, 1.0, 8 * MiB, 0, 32 * MiB, "test", None, 0.0, converge, "x")
    assert [w.observe(p_at(t, True)) for t in (0.0, 0.05, 0.1, 29.9)] == [None] * 4
    assert w.observe(p_at(30.0, True)) is not None          # 30 s since the last progress
    w = ConvergenceWatch(stall_iterations=99, not_converging_iterations=2, min_s=30.0)
    got = [w.observe(p_at(t, False)) for t in (100.0, 100.1, 129.0, 130.0)]
    assert got[:3] == [None] * 3 and got[3] == "not converging for 4 iterations: x"


def test_policy_gives_up_on_non_convergence_as_it_says() -> None:
    p = at(64 * MiB, downtime_s=4.841)
    d, why = Policy().verdict(p, iteration=30, elapsed_s=9, not_converging="not converging: x")
    assert d is Decision.CANCEL             # the documented default: the guest stays here
    assert why == "not converging: x; predicted downtime 4841 ms > limit 300 ms"
    assert Policy(on_timeout="force").decide(p, iteration=30, elapsed_s=9,
                                             not_converging="x") is Decision.FORCE
    assert Policy(on_timeout="force", on_not_converging="cancel").decide(
        p, iteration=30, elapsed_s=9, not_converging="x") is Decision.CANCEL
    # under the limit still switches over
    assert Policy().decide(at(0, 0.1), iteration=30, elapsed_s=9,
                           not_converging="x") is Decision.SWITCHOVER
    with pytest.raises(ValueError, match="on_not_converging"):
        Policy(on_not_converging="wait")
    with pytest.raises(ValueError, match="stall_iterations"):
        Policy(stall_iterations=0)
    with pytest.raises(ValueError, match="negative"):
        Policy(not_converging_min_s=-1)
    assert Policy().not_converging_min_s == 30.0 and Policy().on_timeout == "cancel"


def test_an_opted_out_containers_ram_is_named_in_the_reason() -> None:
    pred = DowntimePredictor(BandwidthEstimator())
    p = pred.predict(IterationInputs(0.0, 16 * MiB, 0, assumed_dirty_bytes=16 * MiB))
    assert p.will_converge
    assert "16777216 bytes of the RAM count dirty at every pass (a device's pre-copy " \
        "dirty tracking is off" in p.reason


def test_a_one_off_first_arc_does_not_become_the_fixed_cost() -> None:
    """Injected timestamps: the setup arc took 1 s (first-call JIT), every later arc 1 ms.
    With nothing left to send the prediction must fall under the 300 ms limit."""
    clock = iter([0.0, 1.0] + [x for i in range(1, 6) for x in (i, i + 0.001)])
    arcs = FixedCostSamples()
    for _ in range(6):
        start, end = next(clock), next(clock)
        arcs.add(end - start)
    pred = DowntimePredictor(BandwidthEstimator())
    arc = arcs.estimate_s
    assert arc == pytest.approx(0.001)
    pred.costs = FixedCosts(device_stop_s=arc, commit_round_trips_s=0.0002, dest_load_resume_s=arc)
    p = pred.predict(IterationInputs(10.0, 0, 0))
    assert p.downtime_s < 0.3
    assert Policy().decide(p, iteration=6, elapsed_s=10) is Decision.SWITCHOVER


def test_fixed_cost_samples_before_and_after_the_first() -> None:
    s = FixedCostSamples(keep=3)
    assert s.estimate_s == 0.0 and s.first_s == 0.0
    s.add(1.0)
    assert s.estimate_s == 1.0              # nothing better known yet
    for x in (0.004, 0.002, 0.003, 0.5):    # the window keeps the last three
        s.add(x)
    assert s.estimate_s == 0.003
    assert s.first_s == 1.0                 # still there: the setup's arc
    with pytest.raises(ValueError, match="negative"):
        s.add(-1)
