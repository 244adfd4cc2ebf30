"""Benchmark ``rss_per_guest`` and ``rss_per_tib_tracked`` (issue 15 item 4): the daemon's
memory against the number of guests and against the RAM whose dirty pages it tracks.

* ``rss_per_guest`` — anonymous RSS (``tests/support/load.rss``: guest RAM is shared memfd
  memory and not counted) of an idle ``vfiod run --backend sim`` daemon with 64 guests x 4
  devices against one with 1 guest x 4 devices, both started in this run; value = the
  growth per added guest, baseline = the 1-guest daemon's RSS (the fixed part, which the
  target allows 64 MiB for).
* ``rss_per_tib_tracked`` — what dirty tracking of a 1 TiB and a 4 TiB guest (4 type1
  containers of a quarter each, every page dirty, one sync done) adds to a process's
  anonymous RSS, per byte of the guest's dirty bitmap (1 bit per 4 KiB page: 32 MiB per
  TiB). Measured in a child process (``python -m tests.bench.bench_rss SIZE_LOG2``) so the
  parent's memory does not blur it; the child's numba kernels are loaded first. The
  simulated kernel writes the "all dirty" answers with memset and holds no bitmap of its
  own in this scope, so the growth is vfiod's. Target: ratio ≤ 1.1 (docs/architecture.md §3).
  ``round_peak_ratio`` is the peak (VmHWM) growth over a source's first round (start with
  everything dirty, take the pass, sync, take the next), per bitmap byte.
* ``rss_after_migration`` — the anonymous RSS of a 1-guest source and destination daemon
  (the ``rss_per_guest`` fleet's guest, 8 MiB of RAM, 4 devices) idle and then after one
  finished migration between them; value = the source's, baseline = the destination's.

Each row is measured twice in the same run: as the test venv runs the daemon and as a
production install would (``production_*``). The test venv has pytest-cov, so
``coverage`` is importable and ``import numba`` imports it (numba/misc/coverage_support.py
tries ``import coverage`` and carries on without it); a production install has no
coverage. The production daemons get a directory first on their path whose
``coverage.py`` raises ``ImportError``, and the bench checks each daemon's
``/proc/PID/maps`` for coverage's C tracer (``coverage_mapped``) to show which was which.

Run alone: ``.venv/bin/python -m tests.bench.run -k rss``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.bench.timing import row
from tests.support.daemons import DaemonProcess, guest_status, wait_until
from tests.support.fleet_configs import fleet_config, fleet_guest
from tests.support.load import rss
from tests.support.production_env import coverage_mapped, without_coverage

ROOT = Path(__file__).resolve().parents[2]
GUESTS, DEVICES = 64, 4
FIXED_TARGET_MIB = 64
BITMAP_TARGET = 1.1
#: ``SessionConfig.max_run_pages``' default: the run length a source takes its passes in
MAX_RUN_PAGES = 1024


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def _idle_rss(guests: int, env: dict[str, str] | None = None) -> tuple[int, bool]:
    d = DaemonProcess(fleet_config("source", guests, DEVICES), f"bench-rss-{guests}", env=env)
    try:
        d.wait_ready()
        d.call("status")                # the control path once, as any real daemon
        return rss(d), coverage_mapped(d.proc.pid)
    finally:
        d.cleanup()


def rss_per_guest() -> dict[str, Any]:
    one, one_cov = _idle_rss(1)
    many, _ = _idle_rss(GUESTS)
    with without_coverage() as env:
        prod, prod_cov = _idle_rss(1, env)
    per = (many - one) / (GUESTS - 1)
    return row("rss_per_guest", per / 2**10, "KiB", "anonymous RSS of the 1-guest daemon (MiB)",
               one / 2**20, per / one, rss_1_guest_mib=_mib(one),
               rss_64_guests_mib=_mib(many), fixed_target_mib=FIXED_TARGET_MIB,
               fixed_met=one <= FIXED_TARGET_MIB * 2**20,
               production_rss_1_guest_mib=_mib(prod),
               production_fixed_met=prod <= FIXED_TARGET_MIB * 2**20,
               coverage_mapped={"test venv": one_cov, "production": prod_cov},
               note=f"idle sim daemons, {DEVICES} devices per guest, 8 MiB guests; "
                    "ratio = per-guest growth / fixed RSS; production_*: coverage not "
                    "importable")


def _migrated_pair(env: dict[str, str] | None = None) -> dict[str, Any]:
    """A 1-guest source and destination: RssAnon idle and after one finished migration."""
    src = DaemonProcess(fleet_config("source", 1, DEVICES), "bench-rss-src", env=env)
    dst = DaemonProcess(fleet_config("destination", 1, DEVICES), "bench-rss-dst", env=env)
    guest = fleet_guest(0)
    try:
        for d in (src, dst):
            d.wait_ready()
            d.call("status")
        idle = {"source": rss(src), "destination": rss(dst)}
        with src.client() as c:
            c.call("migrate", {"guest": guest, "to": dst.migration_address})
            m = wait_until(lambda: (c.call("status", {"guest": guest})["guests"][0]
                                    .get("migration") or {}).get("result"), 120,
                           f"the migration of {guest}")
        if m != "completed":
            raise RuntimeError(f"the measured migration ended {m}:\n{src.log()[-3000:]}")
        wait_until(lambda: guest_status(dst, guest)["state"] == "running", 60,
                   f"{guest} to run on the destination")
        for d in (src, dst):
            d.call("status")            # what an operator asks next
        return {"idle": idle, "after": {"source": rss(src), "destination": rss(dst)},
                "coverage_mapped": coverage_mapped(src.proc.pid) and coverage_mapped(dst.proc.pid)}
    finally:
        for d in (src, dst):
            d.cleanup()


def rss_after_migration() -> dict[str, Any]:
    test = _migrated_pair()
    with without_coverage() as env:
        prod = _migrated_pair(env)
    src, dst = test["after"]["source"], test["after"]["destination"]
    limit = FIXED_TARGET_MIB * 2**20
    return row("rss_after_migration", src / 2**20, "MiB",
               "the destination's anonymous RSS after it (MiB)", dst / 2**20, src / dst,
               idle_mib={k: _mib(v) for k, v in test["idle"].items()},
               after_mib={k: _mib(v) for k, v in test["after"].items()},
               production_idle_mib={k: _mib(v) for k, v in prod["idle"].items()},
               production_after_mib={k: _mib(v) for k, v in prod["after"].items()},
               fixed_target_mib=FIXED_TARGET_MIB,
               fixed_met=max(src, dst) <= limit,
               production_fixed_met=max(prod["after"].values()) <= limit,
               coverage_mapped={"test venv": test["coverage_mapped"],
                                "production": prod["coverage_mapped"]},
               note=f"1 guest x {DEVICES} devices, 8 MiB RAM, one migration source -> "
                    "destination, both ends' RssAnon after it; production_*: the same with "
                    "coverage not importable")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields[field].split()[0]) * 1024


def _anon() -> int:
    return _status("RssAnon")


def _child(size_log2: int) -> dict[str, int]:
    """In a fresh process: RSS growth from tracking a guest of 2^size_log2 pages."""
    from tests.bench.bench_sync import _guest

    def tracked(bits: int) -> int:
        with tempfile.TemporaryDirectory(prefix="vfiod-bench-rss-") as tmp:
            host, containers, tr = _guest(tmp, bits, mdev=False)
            before = _anon()
            tr.start(initial_all_dirty=False)
            tr.sync("precopy")
            grown = _anon() - before
            tr.stop()
            for c in containers:
                c.close()
            host.close()
            return grown

    def migration_round(bits: int) -> int:
        """The peak a source's round adds: start with every page dirty, take the first
        pass, sync, take the next (as ``SourceSession`` does, dropping a pass's runs
        once it was sent). The kernel's high-water mark (VmHWM, reset through
        /proc/self/clear_refs) also sees what lives only inside a call."""
        with tempfile.TemporaryDirectory(prefix="vfiod-bench-rss-") as tmp:
            host, containers, tr = _guest(tmp, bits, mdev=False)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _status("VmRSS")
            tr.start(initial_all_dirty=True)
            runs = tr.take_dirty_runs(MAX_RUN_PAGES)
            del runs                    # the pass was sent (``RamSender.send``)
            tr.sync("precopy")
            runs = tr.take_dirty_runs(MAX_RUN_PAGES)
            most = _status("VmHWM") - before
            del runs
            tr.stop()
            for c in containers:
                c.close()
            host.close()
            return most

    tracked(12)                         # numba's kernels and the sim's first-use memory
    migration_round(12)
    return {"grown": tracked(size_log2), "round_grown": migration_round(size_log2),
            "bitmap_bytes": (1 << size_log2) // 8}


def rss_per_tib_tracked(size_log2: int = 28, quick: bool = False) -> dict[str, Any]:
    sizes = [size_log2] if quick else sorted({size_log2, 30})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    got = {}
    for s in sizes:
        out = subprocess.run([sys.executable, "-m", "tests.bench.bench_rss", str(s)],
                             cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        got[s] = json.loads(out.stdout.strip().splitlines()[-1])
    top = got[sizes[-1]]
    ratio = top["grown"] / top["bitmap_bytes"]
    return row("rss_per_tib_tracked", top["grown"] / 2**20 / ((1 << sizes[-1]) / 2**28),
               "MiB/TiB", "dirty-bitmap bytes per TiB (MiB)", 32.0, ratio,
               target_ratio=BITMAP_TARGET, met=ratio <= BITMAP_TARGET,
               grown_mib={f"2^{s} pages": round(g["grown"] / 2**20, 1) for s, g in got.items()},
               round_peak_ratio=round(top["round_grown"] / top["bitmap_bytes"], 3),
               note="RssAnon growth of a process tracking a guest of 4 type1 containers "
                    "(start + one full sync), per TiB of guest RAM; round_peak_ratio: the peak "
                    "RSS a source's start, first pass taken, sync and second pass taken "
                    f"add (runs of {MAX_RUN_PAGES} pages), per bitmap byte")


def benchmarks() -> list[tuple[str, Any]]:
    return [("rss_per_guest", rss_per_guest), ("rss_after_migration", rss_after_migration),
            ("rss_per_tib_tracked", rss_per_tib_tracked)]


if __name__ == "__main__":
    print(json.dumps(_child(int(sys.argv[1]))))
