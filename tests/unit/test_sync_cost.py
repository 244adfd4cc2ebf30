"""The final dirty sync priced on the line through the syncs a migration timed
(``planning/sync_cost.py``; docs/architecture.md §4 fixed costs)."""

from __future__ import annotations

import pytest

from vfiod.migration.planning.sync_cost import MIN_SPREAD_PAGES, SyncCostLine


def test_nothing_timed_prices_nothing() -> None:
    assert SyncCostLine().estimate_s(1000) == 0.0


def test_one_sync_is_the_price_whatever_it_reported() -> None:
    line = SyncCostLine()
    line.add(0.004, 900)
    assert line.estimate_s(0) == pytest.approx(0.004)
    assert line.estimate_s(5000) == pytest.approx(0.004)


def test_a_setup_sync_and_a_pass_sync_give_the_per_page_part() -> None:
    # the setup's sync reported 2 pages in 1 ms, a pass's 1002 pages in 8 ms: 7 µs a page.
    # The final sync, reporting 10 pages, costs 1.056 ms, not the pass's 8 ms.
    line = SyncCostLine()
    line.add(0.001, 2)
    line.add(0.008, 1002)
    assert line.slope_s() == pytest.approx(7e-6)
    assert line.estimate_s(10) == pytest.approx(0.001 + 8 * 7e-6)
    assert line.estimate_s(0) == pytest.approx(0.001 - 2 * 7e-6)


def test_reports_closer_than_the_spread_give_no_slope() -> None:
    line = SyncCostLine()
    line.add(0.001, 0)
    line.add(0.003, MIN_SPREAD_PAGES - 1)
    assert line.slope_s() == 0.0
    assert line.estimate_s(0) == pytest.approx(0.002)     # their median


def test_a_slower_sync_that_reported_less_gives_no_negative_slope() -> None:
    # a one-off cost in the smaller report (a cold first query) is no slope down
    line = SyncCostLine()
    line.add(0.009, 0)
    line.add(0.002, 5000)
    assert line.slope_s() == 0.0
    assert line.estimate_s(100) == pytest.approx(0.0055)


def test_one_odd_sync_among_many_moves_the_line_little() -> None:
    line = SyncCostLine()
    line.add(0.001, 0)
    for pages in (1000, 2000, 3000):
        line.add(0.001 + 5e-6 * pages, pages)
    line.add(0.050, 1500)                    # held up by the scheduler
    assert line.slope_s() == pytest.approx(5e-6)
    assert line.estimate_s(0) == pytest.approx(0.001)


def test_only_the_recent_syncs_count() -> None:
    line = SyncCostLine(keep=2)
    line.add(0.100, 0)
    line.add(0.001, 0)
    line.add(0.001, 0)
    assert line.samples == 2
    assert line.estimate_s(0) == pytest.approx(0.001)


@pytest.mark.parametrize(("seconds", "pages"), [(-0.001, 1), (0.001, -1)])
def test_negative_samples_are_refused(seconds: float, pages: int) -> None:
    with pytest.raises(ValueError, match="negative"):
        SyncCostLine().add(seconds, pages)
