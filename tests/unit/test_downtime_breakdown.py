"""The downtime, part by part: predicted vs measured (docs/architecture.md §4)."""

from __future__ import annotations

import pytest

from vfiod.migration.planning.breakdown import (
    COMPONENTS,
    actual_parts,
    breakdown,
    predicted_parts,
)
from vfiod.migration.planning.convergence import FixedCostSamples
from vfiod.migration.planning.predictor import (
    BandwidthEstimator,
    DowntimePredictor,
    FixedCosts,
    IterationInputs,
)

MB = 1_000_000


def test_predicted_parts_add_up_to_the_prediction() -> None:
    bw = BandwidthEstimator(None)
    bw.record(0.0, 0.1, 100 * MB)                      # 1 GB/s
    costs = FixedCosts(device_stop_s=0.001, final_sync_s=0.002, record_overhead_s=0.003,
                       verify_s=0.004, commit_round_trips_s=0.005, dest_load_resume_s=0.006)
    pred = DowntimePredictor(bw, costs=costs)
    p = pred.predict(IterationInputs(1.0, dirty_ram_bytes=10 * MB, device_stopcopy_bytes=MB))
    parts = predicted_parts(p, costs)
    assert tuple(parts) == COMPONENTS
    assert sum(parts.values()) == pytest.approx(p.downtime_s)
    assert parts["ram_transfer"] == pytest.approx(0.010 + 0.003)
    assert parts["device_stop"] == pytest.approx(0.001 + 0.001)


def test_the_socket_queue_is_predicted_in_the_commit_wait() -> None:
    # the stream's tail arrives while the source waits for PREPARED: the measured parts
    # put it in the commit's waits, so the prediction does too
    bw = BandwidthEstimator(None)
    bw.record(0.0, 0.1, 100 * MB)                      # 1 GB/s
    costs = FixedCosts(commit_round_trips_s=0.001)
    pred = DowntimePredictor(bw, costs=costs)
    p = pred.predict(IterationInputs(1.0, 0, 0, queued_bytes=3 * MB))
    parts = predicted_parts(p, costs)
    assert parts["commit_round_trips"] == pytest.approx(0.001 + 0.003)
    assert parts["ram_transfer"] == 0.0
    assert sum(parts.values()) == pytest.approx(p.downtime_s)


def test_ready_bytes_come_off_the_device_data_first_then_the_ram() -> None:
    # the devices' stop-copy data is sent before the final RAM pass, so a paced link's
    # full bucket carries it first
    bw = BandwidthEstimator(None)
    bw.record(0.0, 0.1, 100 * MB)                      # 1 GB/s
    costs = FixedCosts(device_stop_s=0.001)
    pred = DowntimePredictor(bw, costs=costs)
    p = pred.predict(IterationInputs(1.0, dirty_ram_bytes=10 * MB, device_stopcopy_bytes=MB,
                                     ready_bytes=3 * MB))
    parts = predicted_parts(p, costs)
    assert parts["device_stop"] == pytest.approx(0.001)
    assert parts["ram_transfer"] == pytest.approx(0.008)
    assert sum(parts.values()) == pytest.approx(p.downtime_s)


def test_actual_parts_give_the_commit_what_is_left() -> None:
    parts = actual_parts(0.050, device_stop_s=0.010, final_sync_s=0.001,
                         ram_transfer_s=0.020, verify_s=0.004, dest_load_resume_s=0.002)
    assert parts["commit_round_trips"] == pytest.approx(0.013)
    assert sum(parts.values()) == pytest.approx(0.050)
    # parts measured on two ends can add up to a little more than the total: never < 0
    over = actual_parts(0.010, device_stop_s=0.010, final_sync_s=0.001,
                        ram_transfer_s=0.0, verify_s=0.0, dest_load_resume_s=0.0)
    assert over["commit_round_trips"] == 0.0
    with pytest.raises(ValueError, match="verify is negative"):
        actual_parts(0.01, device_stop_s=0.0, final_sync_s=0.0, ram_transfer_s=0.0,
                     verify_s=-1.0, dest_load_resume_s=0.0)


def test_breakdown_pairs_each_part() -> None:
    pred = dict.fromkeys(COMPONENTS, 0.001)
    act = dict.fromkeys(COMPONENTS, 0.002)
    b = breakdown(pred, act)
    assert set(b) == set(COMPONENTS)
    assert b["verify"] == {"predicted_s": 0.001, "actual_s": 0.002}


def test_a_one_off_slow_setup_arc_does_not_dominate_later_predictions() -> None:
    # the setup step's arc paid a JIT compilation (1 s); the passes' arcs take 0.2 ms
    arcs = FixedCostSamples()
    arcs.add(1.0)
    for _ in range(3):
        arcs.add(0.0002)
    bw = BandwidthEstimator(None)
    bw.record(0.0, 0.1, 100 * MB)
    costs = FixedCosts(device_stop_s=arcs.estimate_s, dest_load_resume_s=arcs.estimate_s,
                       commit_round_trips_s=0.0001)
    p = DowntimePredictor(bw, costs=costs).predict(
        IterationInputs(1.0, dirty_ram_bytes=MB, device_stopcopy_bytes=0))
    assert p.downtime_s < 0.01                      # 1 MB at 1 GB/s + < 1 ms fixed
