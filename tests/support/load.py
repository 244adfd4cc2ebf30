"""A load on one daemon (README "Limits", "Load"): ``ctl`` requests at a paced rate from
a few threads, a 1 Hz ``/metrics`` scrape, and migrations of several guests at once to a
second daemon, while the daemon's ``WATCHDOG=1`` datagrams are timed and its RSS
(psutil) is read before and after. ``tests/daemon/test_load.py`` and
``tests/bench/bench_load.py`` use it.

Every thread runs on a monotonic schedule: request ``k`` of a thread is due at
``start + k * threads / rate``; a thread that falls behind sends at once (the achieved
rate is what is reported), and none sends past ``duration_s``.
"""

from __future__ import annotations

import select
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil

from tests.support.daemons import DaemonProcess, wait_until
from tests.support.fleet_configs import fleet_config
from vfiod.api import ControlClient

WATCHDOG_USEC = 1_000_000          # the daemon pings every half of it: every 0.5 s


@dataclass
class LoadReport:
    requests: int = 0
    start: float = 0.0
    end: float = 0.0               # when the last request was answered
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    scrapes: int = 0
    scrape_errors: list[str] = field(default_factory=list)
    watchdog_times: list[float] = field(default_factory=list)
    rss_before: int = 0
    rss_after: int = 0
    migrations: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def watchdog_gaps(self) -> list[float]:
        """Silences between pings, from the load's start to its last answer."""
        t = [self.start, *self.watchdog_times, max(self.end, self.start)]
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    def p(self, q: float) -> float:
        """Nearest-rank ``q`` quantile of the request latencies (seconds)."""
        s = sorted(self.latencies)
        return s[min(len(s) - 1, max(0, -int(-q * len(s) // 1) - 1))] if s else 0.0


class WatchdogTimer:
    """Reads the daemon's notify socket on a thread and times every ``WATCHDOG=1``."""

    def __init__(self, d: DaemonProcess, report: LoadReport) -> None:
        self.sock = d.notify.sock
        self.report = report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog-timer", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if ready:
                data = self.sock.recv(65536).decode()
                now = time.monotonic()
                if "WATCHDOG=1" in data.splitlines() and now >= self.report.start:
                    self.report.watchdog_times.append(now)

    def __enter__(self) -> WatchdogTimer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _requester(d: DaemonProcess, report: LoadReport, lock: threading.Lock, start: float,
               period: float, offset: float, end: float, guests: list[str]) -> None:
    k = 0
    with ControlClient(d.socket, timeout=30) as c:
        while True:
            due = start + offset + k * period
            if due >= end:
                return
            delay = due - time.monotonic()
            if delay > 0:
                select.select([], [], [], delay)     # pacing, not waiting for a condition
            args = {"guest": guests[k % len(guests)]} if k % 2 else None
            t0 = time.perf_counter()
            try:
                c.call("status", args)
                err = None
            except Exception as e:  # every failure is counted and reported, not raised
                err = f"{type(e).__name__}: {e}"
                c = c.reopen()
            took = time.perf_counter() - t0
            with lock:
                report.requests += 1
                report.latencies.append(took)
                report.end = max(report.end, time.monotonic())
                if err:
                    report.errors.append(err)
            k += 1


def _scraper(url: str, report: LoadReport, start: float, end: float) -> None:
    k = 0
    while start + k < end:
        delay = start + k - time.monotonic()
        if delay > 0:
            select.select([], [], [], delay)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                if b"vfiod_" not in r.read():
                    report.scrape_errors.append("no vfiod_ metric in the scrape")
        except OSError as e:
            report.scrape_errors.append(str(e))
        report.scrapes += 1
        k += 1


@contextmanager
def fleet_pair(guests: int, devices: int, name: str
               ) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    """A source daemon with ``guests`` x ``devices`` (each guest 8 MiB, 2 MiB written,
    256 KiB/s dirtied) and systemd's watchdog on, and its destination; both ready, both
    cleaned up afterwards."""
    src = DaemonProcess(fleet_config("source", guests, devices, dirty_rate="256KiB",
                                     fill="2MiB"), f"{name}-src",
                        env={"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    dst = DaemonProcess(fleet_config("destination", guests, devices), f"{name}-dst")
    try:
        src.wait_ready()
        dst.wait_ready()
        yield src, dst
    finally:
        src.cleanup()
        dst.cleanup()


def rss(d: DaemonProcess) -> int:
    """The daemon's anonymous resident memory (RssAnon: RSS less file and shmem pages).
    Guest RAM is shared memory (memfd): a migration reading it makes it resident in the
    source's RSS without the daemon holding any more memory of its own."""
    m = psutil.Process(d.proc.pid).memory_info()
    return int(m.rss - m.shared)


def warm_up(src: DaemonProcess, dst: DaemonProcess, guest: str) -> None:
    """One migration, a request and a scrape before measuring: the first migration loads
    numba's compiled kernels and TLS, once per process, which is not growth."""
    with src.client() as c:
        c.call("migrate", {"guest": guest, "to": dst.migration_address})
        wait_until(lambda: (c.call("status", {"guest": guest})["guests"][0].get("migration")
                            or {}).get("result"), 60, f"the warm-up migration of {guest}")
    with urllib.request.urlopen(f"http://{src.metrics_address}/metrics", timeout=10) as r:
        r.read()


def run_load(src: DaemonProcess, dst: DaemonProcess, *, rate: float, threads: int,
             duration_s: float, migrate: list[str], guests: list[str]) -> LoadReport:
    """Load ``src`` for ``duration_s`` while ``migrate`` (guests) move to ``dst`` at once;
    the report holds the source daemon's figures. The migrations must all end (each
    outcome is in ``report.migrations``) before the load stops."""
    report = LoadReport()
    url = f"http://{src.metrics_address}/metrics"
    report.rss_before = rss(src)
    lock = threading.Lock()
    with WatchdogTimer(src, report):
        start = report.start = time.monotonic() + 0.05
        end = start + duration_s
        period = threads / rate
        workers = [threading.Thread(target=_requester, name=f"ctl-load-{i}",
                                    args=(src, report, lock, start, period, i * period / threads,
                                          end, guests))
                   for i in range(threads)]
        workers.append(threading.Thread(target=_scraper, name="scraper",
                                        args=(url, report, start, end)))
        for w in workers:
            w.start()
        with src.client() as c:
            for g in migrate:
                c.call("migrate", {"guest": g, "to": dst.migration_address})

            def ended() -> bool:
                for g in migrate:
                    m = c.call("status", {"guest": g})["guests"][0].get("migration") or {}
                    if m.get("result") is None:
                        return False
                    report.migrations[g] = m
                return True
            wait_until(ended, duration_s + 60, f"the migrations of {migrate} to end")
        for w in workers:
            w.join()
        report.elapsed_s = report.end - start
    report.rss_after = rss(src)
    return report
