"""Earlier switchovers correct what a migration cannot measure before its own: the
commit's waits, the final sync's one-off share, the destination's load and resume
(docs/architecture.md §4)."""

from __future__ import annotations

import pytest

from vfiod.migration.planning.breakdown import COMPONENTS
from vfiod.migration.planning.history import SwitchoverHistory
from vfiod.migration.planning.predictor import FixedCosts

MEASURED = FixedCosts(device_stop_s=0.001, final_sync_s=0.010, commit_round_trips_s=0.0002,
                      dest_load_resume_s=0.0001)


def _actual(**parts: float) -> dict[str, float]:
    return {c: parts.get(c, 0.0) for c in COMPONENTS}


def test_no_history_no_correction() -> None:
    assert SwitchoverHistory().correct(MEASURED) == MEASURED


def test_earlier_switchovers_correct_the_parts_measured_only_at_switchover() -> None:
    h = SwitchoverHistory()
    # the pre-copy sync paid a one-off (10 ms) the final sync did not (0.2 ms); the commit
    # took 2 ms more than two header round trips; the destination's load 3 ms more
    for extra in (0.002, 0.0021, 0.0019):
        h.record(MEASURED, _actual(final_sync=0.0002, commit_round_trips=0.0002 + extra,
                                   dest_load_resume=0.0031))
    got = h.correct(MEASURED)
    assert h.migrations == 3
    assert got.final_sync_s == pytest.approx(0.0002)
    assert got.commit_round_trips_s == pytest.approx(0.0022)
    assert got.dest_load_resume_s == pytest.approx(0.0031)
    # what this migration measures itself is left as it is
    assert got.device_stop_s == MEASURED.device_stop_s
    assert got.verify_s == MEASURED.verify_s


def test_one_odd_switchover_does_not_set_the_correction() -> None:
    h = SwitchoverHistory()
    for commit in (0.001, 0.001, 0.5):                 # one stalled commit among three
        h.record(MEASURED, _actual(final_sync=0.01, commit_round_trips=commit))
    assert h.correct(MEASURED).commit_round_trips_s == pytest.approx(0.001)


def test_a_broken_sync_sample_is_not_a_lesson() -> None:
    h = SwitchoverHistory()
    h.record(MEASURED, _actual(final_sync=100.0))      # a clock jump: 10 000 times
    assert h.correct(MEASURED).final_sync_s == MEASURED.final_sync_s
