"""The final dirty sync's estimate from the syncs of this migration
(``planning/sync_cost.py``; docs/architecture.md §4)."""

from __future__ import annotations

import pytest

from vfiod.migration.planning.sync_cost import (
    MAX_S_PER_PAGE,
    MIN_SPREAD_PAGES,
    SyncCosts,
    robust_line,
)


def test_a_single_pass_estimates_the_fixed_part_not_the_pass_syncs_time() -> None:
    # the demo's shape: a baseline sync of nothing (0.3 ms), then a pre-copy sync of the
    # 4,000 pages the devices wrote in a 0.4 s pass (12 ms)
    s = SyncCosts()
    s.add(0, 0.0003, at=1.0)
    s.add(4000, 0.0123, at=1.4)
    # the final sync comes 2 ms after that sync: 20 pages at the pass's rate
    assert s.expected_pages(1.402) == pytest.approx(20.0)
    assert s.estimate_s(1.402) == pytest.approx(0.0003 + 20 * 0.012 / 4000)
    # the former estimate (the pass's sync itself) was 40 times this one
    assert s.estimate_s(1.402) < 0.0123 / 30


def test_a_sync_late_after_a_fast_writer_costs_its_pages() -> None:
    s = SyncCosts()
    s.add(0, 0.001, at=0.0)
    s.add(10_000, 0.011, at=1.0)                 # 1 us per page, 10,000 pages per second
    assert s.estimate_s(1.5) == pytest.approx(0.001 + 5000 * 1e-6)


def test_no_sync_yet_estimates_nothing_and_one_sync_estimates_itself() -> None:
    s = SyncCosts()
    assert s.estimate_s(5.0) == 0.0 and s.expected_pages(5.0) == 0.0
    s.add(300, 0.002, at=1.0)
    assert s.estimate_s(5.0) == pytest.approx(0.002)


def test_syncs_that_report_alike_give_their_median() -> None:
    s = SyncCosts()
    for i, t in enumerate((0.0010, 0.0012, 0.0030)):
        s.add(10 + i, t, at=float(i))
    assert s.estimate_s(10.0) == pytest.approx(0.0012)


def test_a_slow_baseline_does_not_make_a_slope_below_zero() -> None:
    # a first query's one-off cost (the baseline slower than the pass's sync): no saving
    # per page is made up, the estimate is the median of the two
    s = SyncCosts()
    s.add(0, 0.009, at=0.0)
    s.add(5000, 0.003, at=1.0)
    assert s.estimate_s(1.001) == pytest.approx(0.006)


def test_a_broken_clock_cannot_make_a_slope_beyond_its_bound() -> None:
    s = SyncCosts()
    s.add(0, 0.0, at=0.0)
    s.add(MIN_SPREAD_PAGES, 60.0, at=1.0)       # a minute for 64 pages
    assert s.estimate_s(2.0) <= 60.0 + MAX_S_PER_PAGE * MIN_SPREAD_PAGES


def test_later_syncs_refine_the_line_and_the_rate() -> None:
    s = SyncCosts(keep=3)
    s.add(0, 0.05, at=0.0)                      # dropped: keep=3
    for pages, t, at in ((1000, 0.003, 1.0), (500, 0.002, 1.5), (100, 0.0012, 1.6)):
        s.add(pages, t, at)
    # rate of the last interval: 100 pages in 0.1 s; slope 2 us per page, intercept 1 ms
    assert s.expected_pages(1.7) == pytest.approx(100.0)
    assert s.estimate_s(1.7) == pytest.approx(0.001 + 100 * 2e-6)


def test_bad_samples_are_refused() -> None:
    with pytest.raises(ValueError):
        SyncCosts().add(-1, 0.001, at=0.0)
    with pytest.raises(ValueError):
        SyncCosts().add(1, -0.001, at=0.0)


def test_robust_line_follows_the_many_not_the_one_slow_sample() -> None:
    samples = [(x, 1.0 + 0.5 * x) for x in range(0, 100, 10)] + [(50, 90.0)]
    intercept, slope = robust_line(samples, min_samples=3, min_spread=8, max_slope=10.0)
    assert (intercept, slope) == pytest.approx((1.0, 0.5))
    assert robust_line([], min_samples=1, min_spread=0, max_slope=1.0) == (0.0, 0.0)
    # too few samples, or too little spread: the median, slope 0
    assert robust_line([(0, 1.0), (100, 3.0)], min_samples=3, min_spread=8,
                       max_slope=1.0) == (2.0, 0.0)
    assert robust_line([(0, 1.0), (4, 3.0), (2, 5.0)], min_samples=3, min_spread=8,
                       max_slope=1.0) == (3.0, 0.0)
