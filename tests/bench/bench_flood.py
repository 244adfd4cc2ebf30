"""Benchmarks ``flood_migration_time`` and ``flood_status_p99``: a real migration between
two ``vfiod run --backend sim`` daemons, and ``status`` on both daemons, with and without
the flood of issue 12 (README "Limits"; ``tests/support/flood.py``: 100 idle control
connections per daemon; 50 silent, 50 slow (one byte a second) and 50 malformed
connections on the destination's migration port).

One pair of daemons over mutual TLS (the port the 0.56 s -> 4.6 s finding was on; plain
TCP when the openssl command is missing) holds one 48 MiB guest (24 MiB written, 1 MiB/s
dirtied) with four devices per trial and side, so every migration starts from the same state. Trials alternate: a
migration without the flood, then one under it. A thread asks ``status`` (a new
connection each time, as ``vfiod ctl status`` does) of each daemon in turn every 50 ms
from the moment the flood is opened until the migration ends (at least 40 times per
trial). A first migration, not counted, warms up TLS and numba. The migration time is the
source daemon's record (``finished - started``). Rows: the median migration time under
flood against without it, and the p99 ``status`` latency under flood against without it;
target: both ratios at most 2. Every trial is in ``distribution``.

Run alone: ``.venv/bin/python -m tests.bench.run -k flood``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from tests.bench.timing import row
from tests.support.daemons import DaemonProcess, daemon_pair, wait_until
from tests.support.fleet_configs import fleet_config, fleet_guest
from tests.support.flood import Flood, address

TARGET_RATIO = 2.0
STATUS_PERIOD_S = 0.05
#: ``status`` samples per trial at least: the window outlasts a short migration.
MIN_SAMPLES = 40
MEMORY, FILL = "48MiB", "24MiB"


def percentile(xs: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of a non-empty sample."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(-(-q * len(s) // 1)) - 1))]


class StatusSampler:
    """Times ``status`` on each daemon in turn every ``STATUS_PERIOD_S`` (a monotonic
    schedule) on a thread, until stopped."""

    def __init__(self, daemons: tuple[DaemonProcess, ...]) -> None:
        self.daemons = daemons
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-sampler", daemon=True)

    def __enter__(self) -> StatusSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def enough(self) -> bool:
        return len(self.latencies) >= MIN_SAMPLES

    def _run(self) -> None:
        start = time.monotonic()
        i = 0
        while not self._stop.wait(max(0.0, start + i * STATUS_PERIOD_S - time.monotonic())):
            d = self.daemons[i % len(self.daemons)]
            t0 = time.perf_counter()
            d.call("status")
            self.latencies.append(time.perf_counter() - t0)
            i += 1


def migrate_once(src: DaemonProcess, dst: DaemonProcess, guest: str) -> float:
    """Migrate ``guest``; the source's own record of its duration (seconds)."""
    r = src.ctl("migrate", guest, "--to", dst.migration_address, "--timeout", "60",
                "--on-timeout", "force", "--json")
    final = json.loads(r.stdout.strip().splitlines()[-1])["migration"] if r.stdout else {}
    if r.returncode != 0 or final.get("result") != "completed" or not final.get("verified"):
        raise RuntimeError(f"migration of {guest} failed ({r.returncode}): {r.stdout[-800:]}"
                           f"{r.stderr[-800:]}\n{src.log()[-2000:]}\n{dst.log()[-2000:]}")
    return float(final["finished"]) - float(final["started"])


def _configs(guests: int, pki: Path) -> tuple[str, str, str]:
    src = fleet_config("source", guests, 4, memory=MEMORY, dirty_rate="1MiB", fill=FILL)
    dst = fleet_config("destination", guests, 4, memory=MEMORY)
    from tests.daemon.test_tls_daemons import OPENSSL, _make_ca, _make_host, _tls, _with_tls
    if OPENSSL is None:
        return src, dst, "tcp"
    _make_ca(pki, "ca")
    _make_host(pki, "src", "ca")
    _make_host(pki, "dst", "ca")
    return _with_tls(src, _tls(pki, "src")), _with_tls(dst, _tls(pki, "dst")), "tls"


def bench_flood(quick: bool = False, reps: int = 5) -> list[dict[str, Any]]:
    trials = 2 if quick else max(3, reps)
    times: dict[str, list[float]] = {"plain": [], "flood": []}
    status: dict[str, list[float]] = {"plain": [], "flood": []}
    with tempfile.TemporaryDirectory(prefix="vfiod-bench-flood-") as tmp:
        src_cfg, dst_cfg, transport = _configs(2 * trials + 1, Path(tmp))
        with daemon_pair(src_cfg, dst_cfg, "bench-flood-src", "bench-flood-dst") as (src, dst):
            port = address(dst.migration_address)
            migrate_once(src, dst, fleet_guest(2 * trials))   # warm-up: first TLS, first JIT
            for t in range(trials):
                for j, kind in enumerate(("plain", "flood")):
                    flood: AbstractContextManager[object] = (
                        Flood([src.socket, dst.socket], port) if kind == "flood"
                        else nullcontext())
                    with StatusSampler((src, dst)) as sampler, flood:
                        times[kind].append(migrate_once(src, dst, fleet_guest(2 * t + j)))
                        wait_until(sampler.enough, 30, f"{MIN_SAMPLES} status samples")
                    status[kind].extend(sampler.latencies)
    med = {k: statistics.median(v) for k, v in times.items()}
    p99 = {k: percentile(v, 0.99) * 1e3 for k, v in status.items()}
    note = (f"{trials} trials per side over {transport}, alternating; flood: 100 idle control "
            "connections per daemon, 50 silent + 50 slow (1 B/s) + 50 malformed on the "
            "migration port; target ratio <= 2")
    return [
        row("flood_migration_time", med["flood"], "s", "the same migration without the flood",
            med["plain"], med["flood"] / med["plain"], target_ratio=TARGET_RATIO, note=note,
            distribution={k: [round(x, 4) for x in v] for k, v in times.items()}),
        row("flood_status_p99", p99["flood"], "ms", "status p99 without the flood",
            p99["plain"], p99["flood"] / p99["plain"], target_ratio=TARGET_RATIO, note=note,
            samples={k: len(v) for k, v in status.items()},
            distribution={k: {"median_ms": round(statistics.median(v) * 1e3, 3),
                              "p90_ms": round(percentile(v, 0.9) * 1e3, 3),
                              "max_ms": round(max(v) * 1e3, 3)} for k, v in status.items()}),
    ]
