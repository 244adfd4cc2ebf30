"""``make kernel-bench`` (tests/kernel/bench.py) on the host, without booting: its figures
and that ``make test`` never runs its guest matrix (docs/testing.md "The real-kernel
tier")."""

from __future__ import annotations

import pytest

from tests.kernel import bench, results
from tests.kernel.test_kernel_tier import GUEST_DIR, GUEST_TESTS


def test_kernel_bench_is_not_part_of_the_guest_suite() -> None:
    assert (GUEST_DIR.parent.parent.parent / bench.GUEST_BENCH).exists()
    assert (GUEST_DIR.parent.parent.parent / bench.GUEST_RSS_BENCH).exists()
    assert not any(t.startswith("bench_") for t in GUEST_TESTS)
    assert results.discover_guest_tests(GUEST_DIR) == GUEST_TESTS


def test_kernel_bench_p90_interpolates_between_ranks() -> None:
    assert bench.p90([0.5]) == 0.5
    assert bench.p90([float(x) for x in range(11)]) == pytest.approx(9.0)
    assert bench.p90([0.0, 1.0]) == pytest.approx(0.9)


def _row(error: float) -> dict[str, float | str | int]:
    return {"case": "c", "run": 0, "predicted_s": 0.01, "actual_s": 0.01, "error": error}


def test_kernel_bench_summary_checks_each_target() -> None:
    guest = {"fresh_first": _row(0.3),
             "cases": [_row(e) for e in (0.1, 0.1, 0.15, 0.2, 0.9)]}
    s = bench.summarize(guest)
    assert (s["error_median"], s["median_met"]) == (0.15, True)
    assert s["error_p90"] == pytest.approx(0.62) and s["p90_met"] is False
    assert (s["fresh_first_error"], s["fresh_first_met"]) == (0.3, False)
    text = bench.table(guest, s)
    assert "c (fresh)" in text and "NOT met" in text and "5 migrations" in text


def test_kernel_bench_runs_come_from_the_environment_or_refuse_it() -> None:
    assert bench.runs_from(None) == bench.DEFAULT_RUNS
    assert bench.runs_from("5") == 5
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(ValueError, match="VFIOD_KBENCH_RUNS"):
            bench.runs_from(bad)


def test_kernel_bench_rss_is_checked_against_the_fixed_part() -> None:
    rss = {"idle_mib": {"source": 47.5, "destination": 48.0},
           "after_mib": {"source": 63.9, "destination": 64.2}}
    s = bench.rss_summary(rss)
    assert (s["fixed_target_mib"], s["fixed_met"]) == (64, False)   # the worse end decides
    line = bench.rss_line(s)
    assert "source 47.5 idle, 63.9 after" in line and "destination 48.0 idle, 64.2" in line
    assert "NOT met" in line
    rss["after_mib"]["destination"] = 63.0
    assert bench.rss_summary(rss)["fixed_met"] is True
