"""A load on one daemon (README "Limits", "Load"): ``status`` requests offered at a
fixed rate over a few persistent control connections, a 1 Hz ``/metrics`` scrape, and
migrations of several guests at once to a second daemon, while the daemon's
``WATCHDOG=1`` datagrams are timed and its RSS (psutil) is read before and after.
``tests/daemon/test_load.py`` and ``tests/bench/bench_load.py`` use it.

The requests come from one thread (``_generate``), open loop: request ``k`` is sent at
``start + k / rate`` whether or not the earlier ones were answered, so a slow daemon shows
as latency and a lower achieved rate, not as a slower offer. The generator reads answers
as raw lines and checks each one's id and ``"ok":true`` prefix instead of decoding the
whole JSON (a full ``status`` is about 24 KB): on a two-core machine a client decoding
every answer, or eight client threads taking turns at the GIL, was the bottleneck before
the daemon was (README "Load"). Latency is from the moment a request is offered
(queued for sending) to its answer's arrival.
"""

from __future__ import annotations

import select
import selectors
import socket
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tests.support.daemons import DaemonProcess, wait_until
from tests.support.fleet_configs import fleet_config
from tests.support.production_env import anon_rss
from vfiod.api.schema import SCHEMA_VERSION, Request, Response

WATCHDOG_USEC = 1_000_000          # the daemon pings every half of it: every 0.5 s
#: seconds the generator waits for the last answers after the last request was due
ANSWER_DEADLINE_S = 30.0
#: every this many answers one is decoded in full (``Response.decode``), not just checked
FULL_CHECK = 50


@dataclass
class LoadReport:
    requests: int = 0
    start: float = 0.0
    end: float = 0.0               # when the last request was answered
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    #: when each request was offered (``time.perf_counter``), in the order of ``latencies``
    offered: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    scrapes: int = 0
    scrape_errors: list[str] = field(default_factory=list)
    #: (start, end) of each scrape (``time.perf_counter``)
    scrape_spans: list[tuple[float, float]] = field(default_factory=list)
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

    def p(self, q: float, latencies: list[float] | None = None) -> float:
        """Nearest-rank ``q`` quantile of the request latencies (seconds), or of
        ``latencies``."""
        s = sorted(self.latencies if latencies is None else latencies)
        return s[min(len(s) - 1, max(0, -int(-q * len(s) // 1) - 1))] if s else 0.0

    def during_scrapes(self) -> tuple[list[float], list[float]]:
        """The latencies of the requests in flight while a scrape ran, and of the rest."""
        spans = self.scrape_spans
        during: list[float] = []
        rest: list[float] = []
        for t, lat in zip(self.offered, self.latencies, strict=True):
            hit = any(a < t + lat and t < b for a, b in spans)
            (during if hit else rest).append(lat)
        return during, rest


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


class _Connection:
    """One persistent control connection of the generator, non-blocking: the requests not
    yet taken by the daemon wait in ``out``, and those in flight in ``waiting`` (oldest
    first: the daemon answers in order). A blocking send would deadlock once both
    directions fill up: the generator stuck sending requests the daemon does not read
    while the daemon is stuck sending answers the generator does not read."""

    def __init__(self, path: str, sel: selectors.BaseSelector) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.sel = sel
        sel.register(self.sock, selectors.EVENT_READ, self)
        self.buf = b""
        self.out = bytearray()
        self.waiting: deque[tuple[int, float]] = deque()     # (request id, offered at)

    def offer(self, rid: int, data: bytes) -> None:
        self.waiting.append((rid, time.perf_counter()))
        self.out += data
        self.flush()

    def flush(self) -> None:
        try:
            del self.out[:self.sock.send(self.out)]
        except BlockingIOError:
            pass
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
        if self.sel.get_key(self.sock).events != events:
            self.sel.modify(self.sock, events, self)


def _expected(rid: int) -> bytes:
    """How the daemon's answer to request ``rid`` starts when it succeeded (``_line``'s
    compact encoding): checked on every answer without parsing the 24 KB of JSON."""
    return b'{"schema":%d,"id":%d,"ok":true,"result":{' % (SCHEMA_VERSION, rid)


def _generate(path: str, report: LoadReport, start: float, rate: float, total: int,
              connections: int, guests: list[str]) -> None:
    """Offer ``total`` ``status`` requests, request ``k`` at ``start + k / rate``, on
    ``connections`` persistent connections from this one thread (open loop: a request is
    sent when due whether or not earlier ones were answered; it goes to the connection
    with the fewest in flight, pipelined behind them if every one is busy). Every
    ``FULL_CHECK``-th answer is also decoded in full."""
    sel = selectors.DefaultSelector()
    conns = [_Connection(path, sel) for _ in range(connections)]
    k = answered = 0
    give_up = start + total / rate + ANSWER_DEADLINE_S
    try:
        while answered < total:
            now = time.monotonic()
            while k < total and start + k / rate <= now:
                args = {"guest": guests[k % len(guests)]} if k % 2 else {}
                min(conns, key=lambda c: len(c.waiting)).offer(
                    k, Request("status", args, k).encode())
                k += 1
            if now > give_up:
                report.errors.append(f"{total - answered} requests unanswered after "
                                     f"{ANSWER_DEADLINE_S:g} s")
                return
            due = start + k / rate if k < total else give_up
            for key, events in sel.select(max(0.0, due - now)):
                if events & selectors.EVENT_WRITE:
                    key.data.flush()
                if events & selectors.EVENT_READ:
                    answered += _read_answers(key.data, report)
    finally:
        sel.close()
        for c in conns:
            c.sock.close()


def _read_answers(c: _Connection, report: LoadReport) -> int:
    try:
        chunk = c.sock.recv(1 << 20)
    except BlockingIOError:
        return 0
    if not chunk:
        raise ConnectionError(f"the daemon closed a control connection with "
                              f"{len(c.waiting)} requests in flight")
    c.buf += chunk
    got = 0
    while (nl := c.buf.find(b"\n")) >= 0:
        line, c.buf = c.buf[:nl], c.buf[nl + 1:]
        took = time.perf_counter()
        rid, sent = c.waiting.popleft()
        if not line.startswith(_expected(rid)):
            report.errors.append(f"request {rid}: {line[:300]!r}")
        elif rid % FULL_CHECK == 0 and not Response.decode(line).ok:
            report.errors.append(f"request {rid}: not ok")
        report.requests += 1
        report.latencies.append(took - sent)
        report.offered.append(sent)
        report.end = time.monotonic()
        got += 1
    return got


def _scraper(url: str, report: LoadReport, start: float, end: float) -> None:
    k = 0
    while start + k < end:
        delay = start + k - time.monotonic()
        if delay > 0:
            select.select([], [], [], delay)
        began = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                if b"vfiod_" not in r.read():
                    report.scrape_errors.append("no vfiod_ metric in the scrape")
        except OSError as e:
            report.scrape_errors.append(str(e))
        report.scrape_spans.append((began, time.perf_counter()))
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
    """The daemon's anonymous resident memory (``production_env.anon_rss``)."""
    return anon_rss(d.proc.pid)


def warm_up(src: DaemonProcess, dst: DaemonProcess, guest: str) -> None:
    """One migration, a request and a scrape before measuring: the first migration loads
    numba's compiled kernels and TLS, once per process, which is not growth."""
    with src.client() as c:
        c.call("migrate", {"guest": guest, "to": dst.migration_address})
        wait_until(lambda: (c.call("status", {"guest": guest})["guests"][0].get("migration")
                            or {}).get("result"), 60, f"the warm-up migration of {guest}")
    with urllib.request.urlopen(f"http://{src.metrics_address}/metrics", timeout=10) as r:
        r.read()


def run_load(src: DaemonProcess, dst: DaemonProcess, *, rate: float, connections: int,
             duration_s: float, migrate: list[str], guests: list[str]) -> LoadReport:
    """Load ``src`` for ``duration_s`` while ``migrate`` (guests) move to ``dst`` at once;
    the report holds the source daemon's figures. The migrations must all end (each
    outcome is in ``report.migrations``) before the load stops."""
    report = LoadReport()
    url = f"http://{src.metrics_address}/metrics"
    report.rss_before = rss(src)
    total = round(rate * duration_s)
    with WatchdogTimer(src, report):
        start = report.start = time.monotonic() + 0.05
        end = start + duration_s
        failed: list[str] = []

        def generate() -> None:
            try:
                _generate(src.socket, report, start, rate, total, connections, guests)
            except Exception as e:  # the report carries it; the thread must not swallow it
                failed.append(f"{type(e).__name__}: {e} ({time.monotonic() - start:.2f} s "
                              f"into the load, {report.requests} answered)")
        workers = [threading.Thread(target=generate, name="ctl-load"),
                   threading.Thread(target=_scraper, name="scraper",
                                    args=(url, report, start, end))]
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
        report.errors.extend(failed)
        report.elapsed_s = report.end - start
    report.rss_after = rss(src)
    return report
