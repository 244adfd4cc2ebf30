"""What ``vfiod demo`` reads from both daemons' Prometheus endpoints while the migration
runs, as a scraper would (README "Running the daemon"): ``GET /metrics``, parsed with the client
library's own text parser, reduced to the figures of guest ``vm1`` the demo shows.

A sample holds, per daemon: whether a migration of the guest is active and its phase,
whether the guest runs there, and on the source the pre-copy pass, the predicted
downtime, the RAM not yet sent and the bandwidth estimate. ``pick`` keeps a bounded,
evenly spread selection of the samples for the summary.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from vfiod.cli.demo_procs import DemoStepError
from vfiod.cli.demo_setup import GUEST

SCRAPE_STEP = "scrape the daemons' /metrics"
#: gauge (without the ``vfiod_`` prefix) -> the sample's key
GAUGES = {
    "migration_active": "active",
    "guest_running": "running",
    "migration_iterations": "iteration",
    "migration_predicted_downtime_seconds": "predicted_downtime_s",
    "migration_ram_remaining_bytes": "ram_remaining_bytes",
    "migration_bandwidth_bytes_per_second": "bandwidth_bps",
}


def scrape(address: str, role: str, timeout: float = 10.0) -> dict[str, Any]:
    """Guest ``vm1``'s figures at ``address`` (HOST:PORT); ``DemoStepError`` if the
    endpoint does not answer or answers something else than Prometheus text."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as r:
            text = r.read().decode()
        families = list(text_string_to_metric_families(text))
    except (OSError, ValueError) as e:
        raise DemoStepError(SCRAPE_STEP, f"the {role} daemon's http://{address}/metrics: "
                            f"{e}") from None
    out: dict[str, Any] = {key: None for key in GAUGES.values()}
    out["phase"] = None
    for f in families:
        key = GAUGES.get(f.name.removeprefix("vfiod_"))
        for s in f.samples:
            if s.labels.get("guest") != GUEST:
                continue
            if key is not None:
                out[key] = s.value
            elif f.name == "vfiod_migration_phase" and s.value == 1:
                out["phase"] = s.labels["phase"]
    return out


class DemoScraper:
    """Scrapes both daemons every ``interval_s`` while the migration runs
    (``due``/``take``), and keeps every sample, its time since ``t0``."""

    def __init__(self, source: str, destination: str, interval_s: float, t0: float) -> None:
        self.addresses = {"source": source, "destination": destination}
        self.interval_s = interval_s
        self.t0 = t0
        self.samples: list[dict[str, Any]] = []
        self._next = t0

    def due(self) -> float:
        """Seconds until the next scrape is due (0 when it is)."""
        return max(0.0, self._next - time.monotonic())

    def take(self, when: str = "during") -> dict[str, Any]:
        now = time.monotonic()
        sample: dict[str, Any] = {"t_s": round(now - self.t0, 3), "when": when}
        for role, address in self.addresses.items():
            sample[role] = scrape(address, role)
        self.samples.append(sample)
        self._next = now + self.interval_s
        return sample

    def during_migration(self) -> list[dict[str, Any]]:
        """Samples in which the source's migration of the guest was active."""
        return [s for s in self.samples if s["when"] == "during" and s["source"]["active"]]


def pick(samples: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """At most ``n`` of ``samples``, evenly spread, the first and the last among them."""
    if len(samples) <= n:
        return list(samples)
    if n == 1:
        return [samples[-1]]
    step = (len(samples) - 1) / (n - 1)
    return [samples[round(i * step)] for i in range(n)]
