"""Load on one daemon (README "Limits", "Load"; issue 12): 16 guests x 4 devices, four of
them migrating at once to a second daemon, ``status`` requests offered at 200/s on four
connections for 3 s, and a 1 Hz ``/metrics`` scrape. Every request is answered, the
migrations complete verified, the watchdog (``WATCHDOG_USEC`` 1 s) is never silent for
its interval, and the daemon's own resident memory grows by less than
``RSS_GROWTH_BOUND`` (after a warm-up migration)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.daemons import DaemonProcess
from tests.support.fleet_configs import fleet_guest
from tests.support.load import WATCHDOG_USEC, fleet_pair, run_load, warm_up

GUESTS, DEVICES = 16, 4
RATE, CONNECTIONS, DURATION_S = 200.0, 4, 3.0
#: Anonymous memory (guest RAM is shared memory, not counted). Requests and scrapes alone
#: add nothing measurable; four guests migrating away add about 2 MiB (measured: 86 -> 88
#: MiB; it was 91 -> 114 before the first pass's read buffers stopped piling up in glibc's
#: arenas, README "Limits"), so the bound is 2 MiB per migration: tight enough to catch
#: that again.
MIGRATING = 4
RSS_GROWTH_BOUND = (2 * MIGRATING) << 20


@pytest.fixture()
def fleet() -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    with fleet_pair(GUESTS, DEVICES, "load") as pair:
        yield pair


def test_load_leaves_watchdog_requests_and_memory_intact(
        fleet: tuple[DaemonProcess, DaemonProcess]) -> None:
    src, dst = fleet
    guests = [fleet_guest(i) for i in range(GUESTS)]
    warm_up(src, dst, guests[-1])
    r = run_load(src, dst, rate=RATE, connections=CONNECTIONS, duration_s=DURATION_S,
                 migrate=guests[:MIGRATING], guests=guests)
    assert r.errors == [], r.errors[:5]
    assert r.requests == int(RATE * DURATION_S)
    assert r.rate > RATE / 2, f"{r.rate:.0f} requests/s"
    for g, m in r.migrations.items():
        assert m["result"] == "completed" and m["verified"] is True, (g, m, src.log()[-3000:])
    assert r.scrapes >= DURATION_S and r.scrape_errors == []
    assert max(r.watchdog_gaps) < WATCHDOG_USEC / 1e6, (r.watchdog_gaps, src.log()[-3000:])
    assert r.rss_after - r.rss_before < RSS_GROWTH_BOUND, (r.rss_before, r.rss_after)
    print(f"load: {r.requests} requests, {r.rate:.0f}/s, p99 {r.p(0.99) * 1e3:.1f} ms, "
          f"watchdog max gap {max(r.watchdog_gaps):.2f} s, "
          f"RSS {r.rss_before >> 20} -> {r.rss_after >> 20} MiB")
