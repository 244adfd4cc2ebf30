"""Benchmark ``load_ctl_rate`` and ``load_status_p99``: one ``vfiod run --backend sim``
daemon with 16 guests x 4 devices under load (issue 12; README "Limits", "Load";
``tests/support/load.py``): ``status`` requests offered at 1,000/s, open loop, by one
generator thread over eight persistent connections for 10 s, a 1 Hz ``/metrics`` scrape,
and eight guests migrating at once to a second daemon. The baseline is the same daemon's
``status`` p99 at 50/s on one connection with nothing else running, measured in the same
run first.

Rows: the achieved request rate against the 1,000/s asked for, and the p99 latency under
load against the quiet p99; notes carry the watchdog's longest silence (``WATCHDOG_USEC``
1 s: the daemon pings every 0.5 s), the daemon's anonymous RSS before and after (after a
warm-up migration) and the migrations' outcomes.

Run alone: ``.venv/bin/python -m tests.bench.run -k load``.
"""

from __future__ import annotations

from typing import Any

from tests.bench.timing import row
from tests.support.fleet_configs import fleet_guest
from tests.support.load import fleet_pair, run_load, warm_up

GUESTS, DEVICES, MIGRATING = 16, 4, 8
RATE, CONNECTIONS = 1000.0, 8


def bench_load(quick: bool = False) -> list[dict[str, Any]]:
    duration = 4.0 if quick else 10.0
    guests = [fleet_guest(i) for i in range(GUESTS)]
    with fleet_pair(GUESTS, DEVICES, "bench-load") as (src, dst):
        warm_up(src, dst, guests[-1])
        quiet = run_load(src, dst, rate=50.0, connections=1, duration_s=3.0, migrate=[],
                         guests=guests)
        r = run_load(src, dst, rate=RATE, connections=CONNECTIONS, duration_s=duration,
                     migrate=guests[:MIGRATING], guests=guests)
    outcomes = {g: (m["result"], m["verified"]) for g, m in r.migrations.items()}
    if r.errors or any(o != ("completed", True) for o in outcomes.values()):
        raise RuntimeError(f"load: errors {r.errors[:5]}, migrations {outcomes}")
    notes = {"note": f"{GUESTS} guests x {DEVICES} devices, {MIGRATING} migrating at once, "
                     f"{CONNECTIONS} connections (one open-loop generator thread) for "
                     f"{duration:g} s, 1 Hz scrape",
             "requests": r.requests, "scrapes": r.scrapes, "scrape_errors": len(r.scrape_errors),
             "watchdog_max_gap_s": round(max(r.watchdog_gaps), 3),
             "watchdog_pings": len(r.watchdog_times),
             "rss_anon_before_mib": round(r.rss_before / 2**20, 1),
             "rss_anon_after_mib": round(r.rss_after / 2**20, 1),
             "rss_growth_mib": round((r.rss_after - r.rss_before) / 2**20, 1),
             "quiet_rss_growth_mib": round((quiet.rss_after - quiet.rss_before) / 2**20, 1),
             "latency_ms": {"median": round(r.p(0.5) * 1e3, 3), "p90": round(r.p(0.9) * 1e3, 3),
                            "p99": round(r.p(0.99) * 1e3, 3),
                            "max": round(max(r.latencies) * 1e3, 3)}}
    return [
        row("load_ctl_rate", r.rate, "requests/s", "requests/s asked for", RATE, r.rate / RATE,
            target_ratio=1.0, **notes),
        row("load_status_p99", r.p(0.99) * 1e3, "ms", "status p99, one client at 50/s, idle",
            quiet.p(0.99) * 1e3, r.p(0.99) / quiet.p(0.99), **notes),
    ]
