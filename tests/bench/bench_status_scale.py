"""Benchmark ``status_p99_64x4`` (issue 15 item 4): ``ctl status`` latency on one
``vfiod run --backend sim`` daemon with 64 guests x 4 devices (``fleet_pair``: each guest
runs a sim workload dirtying 256 KiB/s in the daemon, none migrates), offered at 100/s, open
loop, over two persistent connections for 5 s (``tests/support/load.py``; every other
request asks for all guests, the rest for one), with the load's 1 Hz ``/metrics`` scrape.
Latency is from the moment a request is due to its answer's arrival, so the client's own
reading is in it. Baseline: the same daemon's p50 in the same run. Target: p99 ≤ 5 ms.

The row also splits the requests by whether a scrape was in flight while they were (the
scrape's exposition of 1,316 samples held the daemon's GIL for 10-25 ms when every sample
was formatted at each scrape, and a request that arrived then waited for it; the families
that did not change are now reused, daemon/metrics_exposition.py): ``p99_no_scrape_ms`` over the others,
``p99_during_scrape_ms`` and ``during_scrape`` (how many), and ``scrape_ms`` (the median
scrape as the client timed it). ``cpu_pressure``: the share of the measured load's time
in which some task on the host waited for a CPU (``/proc/pressure/cpu``; other jobs on a
shared machine show there, and so do the daemon's own threads).

Run alone: ``.venv/bin/python -m tests.bench.run -k status_p99``.
"""

from __future__ import annotations

import time
from pathlib import Path
from statistics import median
from typing import Any

from tests.bench.timing import row
from tests.support.fleet_configs import fleet_guest
from tests.support.load import fleet_pair, run_load

GUESTS, DEVICES = 64, 4
RATE, CONNECTIONS = 100.0, 2
TARGET_MS = 5.0
PRESSURE = Path("/proc/pressure/cpu")


def _cpu_waited_us() -> int | None:
    """Microseconds in which some task waited for a CPU since boot (None without PSI)."""
    try:
        some = PRESSURE.read_text().splitlines()[0]
    except OSError:
        return None
    return int(some.rsplit("total=", 1)[1])


def bench_status_p99_64x4(quick: bool = False) -> dict[str, Any]:
    guests = [fleet_guest(i) for i in range(GUESTS)]
    with fleet_pair(GUESTS, DEVICES, "bench-status") as (src, dst):
        run_load(src, dst, rate=20.0, connections=1, duration_s=1.0, migrate=[],
                 guests=guests)                      # warm-up: first answers, imports
        waited, began = _cpu_waited_us(), time.monotonic()
        r = run_load(src, dst, rate=RATE, connections=CONNECTIONS,
                     duration_s=2.0 if quick else 5.0, migrate=[], guests=guests)
        after = _cpu_waited_us()
        pressure = (round((after - waited) / 1e6 / (time.monotonic() - began), 3)
                    if waited is not None and after is not None else None)
    if r.errors:
        raise RuntimeError(f"status load: {r.errors[:5]}")
    p99 = r.p(0.99) * 1e3
    during, rest = r.during_scrapes()
    return row("status_p99_64x4", p99, "ms", "p50 of the same requests", r.p(0.5) * 1e3,
               p99 / (r.p(0.5) * 1e3), target_ms=TARGET_MS, met=p99 <= TARGET_MS,
               requests=r.requests, max_ms=round(max(r.latencies) * 1e3, 3),
               p99_no_scrape_ms=round(r.p(0.99, rest) * 1e3, 3),
               p99_during_scrape_ms=round(r.p(0.99, during) * 1e3, 3),
               during_scrape=len(during),
               scrape_ms=round(median(b - a for a, b in r.scrape_spans) * 1e3, 1)
               if r.scrape_spans else None,
               cpu_pressure=pressure,
               note=f"{GUESTS} guests x {DEVICES} devices with sim workloads, {RATE:g}/s over "
                    f"{CONNECTIONS} connections; half full status, half one guest")
