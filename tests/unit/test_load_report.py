"""The load generator's report (``tests/support/load.py``): quantiles over all requests or
a subset, and the split of the requests by whether a scrape was in flight while they were
(``tests/bench/bench_status_scale.py`` reports both sides)."""

from __future__ import annotations

from tests.support.load import LoadReport


def test_requests_overlapping_a_scrape_are_told_from_the_rest() -> None:
    r = LoadReport(latencies=[0.001, 0.004, 0.002, 0.001, 0.003],
                   offered=[0.0, 0.998, 1.0045, 1.010, 2.5],
                   scrape_spans=[(1.0, 1.005), (2.0, 2.02)])
    during, rest = r.during_scrapes()
    # 0.998 + 4 ms ends inside the first scrape, 1.0045 starts in it; 1.010 starts after
    # it ended, 2.5 is after the second
    assert during == [0.004, 0.002] and rest == [0.001, 0.001, 0.003]
    assert r.p(1.0, rest) == 0.003 and r.p(0.5) == 0.002 and r.p(0.99, []) == 0.0
