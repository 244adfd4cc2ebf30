"""``make kernel-bench``: the downtime prediction's error on the real kernel (issue 14;
docs/architecture.md §4; docs/testing.md "The real-kernel tier"), and a production
daemon's memory after a migration there (issue 15 item 4).

    python -m tests.kernel.bench [--out PATH] [--rss-only]

Boots the real-kernel tier's guest once (the same assets, numba cache and QEMU machinery
as ``make kernel-test``) and runs only the guest benches there:
tests/kernel/guest/bench_native_dma_prediction.py, a matrix of vfiod_dma state sizes, DMA
writer rates and link caps, migrated through vfiod's session; and
tests/kernel/guest/bench_native_dma_rss.py, two ``--backend linux`` daemons as installed
in production, their anonymous RSS idle and after one migration. Prints each case's
predicted and actual downtime and error, the median and p90 of |predicted - actual| /
actual against the targets (0.2 and 0.4), a fresh process's first prediction, and both
daemons' RSS against the 64 MiB fixed part; writes everything to
``.bench/kernel-prediction.json``.
``make test`` never runs it: the file is not a test module and the guest suite names
only ``test_*.py``. ``VFIOD_KBENCH_RUNS`` sets the runs per case (default 3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.kernel import assets as assets_mod
from tests.kernel import vm as vm_mod
from tests.kernel.guest import numba_cache
from tests.kernel.results import (
    KERNEL_BENCH_RESULT_FILE,
    KERNEL_BENCH_RUNS_FILE,
    KERNEL_RSS_RESULT_FILE,
)

GUEST_BENCH = "tests/kernel/guest/bench_native_dma_prediction.py"
GUEST_RSS_BENCH = "tests/kernel/guest/bench_native_dma_rss.py"
MEDIAN_TARGET = 0.2
#: the daemon's fixed part (issue 15 item 4: RSS <= 64 MiB + 1.1 x the bitmap bytes; the
#: bench's guest has 16 MiB of RAM, a 512-byte bitmap)
RSS_FIXED_TARGET_MIB = 64
DEFAULT_RUNS = 3
P90_TARGET = 0.4


def runs_from(raw: str | None) -> int:
    """Runs per case from ``VFIOD_KBENCH_RUNS`` (None: the default)."""
    if raw is None:
        return DEFAULT_RUNS
    try:
        runs = int(raw)
    except ValueError:
        runs = 0
    if runs < 1:
        raise ValueError(f"VFIOD_KBENCH_RUNS={raw!r} is not a whole number of runs >= 1")
    return runs


def p90(xs: list[float]) -> float:
    """The 90th percentile, interpolated between the two nearest ranks."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    at = 0.9 * (len(s) - 1)
    lo = int(at)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (at - lo)


def summarize(guest: dict[str, Any]) -> dict[str, Any]:
    """The overall figures of the guest's rows, each against its target."""
    errors = [c["error"] for c in guest["cases"]]
    med, high = statistics.median(errors), p90(errors)
    first = guest["fresh_first"]["error"]
    return {"cases": len(errors), "error_median": round(med, 4), "error_p90": round(high, 4),
            "fresh_first_error": first, "median_target": MEDIAN_TARGET,
            "p90_target": P90_TARGET, "median_met": med <= MEDIAN_TARGET,
            "p90_met": high <= P90_TARGET,
            "fresh_first_met": first <= MEDIAN_TARGET}


def rss_summary(rss: dict[str, Any]) -> dict[str, Any]:
    """The production daemons' RSS after the migration against the fixed part's target."""
    worst = max(rss["after_mib"].values())
    return {**rss, "fixed_target_mib": RSS_FIXED_TARGET_MIB,
            "fixed_met": worst <= RSS_FIXED_TARGET_MIB}


def rss_line(s: dict[str, Any]) -> str:
    idle, after = s["idle_mib"], s["after_mib"]
    return (f"production daemons' RSS (anonymous, MiB): source {idle['source']:.1f} idle, "
            f"{after['source']:.1f} after the migration; destination "
            f"{idle['destination']:.1f} idle, {after['destination']:.1f} after (target <= "
            f"{s['fixed_target_mib']}: {'met' if s['fixed_met'] else 'NOT met'})")


def table(guest: dict[str, Any], summary: dict[str, Any]) -> str:
    lines = [f"{'case':<40} {'run':>3} {'predicted ms':>12} {'actual ms':>10} {'error':>7}"]
    first = guest["fresh_first"]
    lines.append(f"{first['case'] + ' (fresh)':<40} {'-':>3} "
                 f"{first['predicted_s'] * 1000:>12.1f} {first['actual_s'] * 1000:>10.1f} "
                 f"{first['error']:>7.3f}")
    for c in guest["cases"]:
        lines.append(f"{c['case']:<40} {c['run']:>3} {c['predicted_s'] * 1000:>12.1f} "
                     f"{c['actual_s'] * 1000:>10.1f} {c['error']:>7.3f}")

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"
    lines.append(f"median error {summary['error_median']:.3f} (target <= {MEDIAN_TARGET}: "
                 f"{met(summary['median_met'])}); p90 {summary['error_p90']:.3f} "
                 f"(target <= {P90_TARGET}: {met(summary['p90_met'])}); fresh process's "
                 f"first {summary['fresh_first_error']:.3f} "
                 f"({met(summary['fresh_first_met'])}); {summary['cases']} migrations")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.kernel.bench")
    ap.add_argument("--out", type=Path, default=None,
                    help="where the figures go (default .bench/kernel-prediction.json, "
                         "with --rss-only .bench/kernel-rss.json)")
    ap.add_argument("--rss-only", action="store_true",
                    help="run only the RSS bench (two daemons, one migration: a minute "
                         "under TCG), not the prediction matrix")
    args = ap.parse_args(argv)
    out = args.out or assets_mod.REPO / ".bench" / ("kernel-rss.json" if args.rss_only
                                                    else "kernel-prediction.json")
    try:
        runs = runs_from(os.environ.get("VFIOD_KBENCH_RUNS"))
    except ValueError as e:
        print(f"kernel-bench: {e}", file=sys.stderr)
        return 2
    why = vm_mod.why_not_runnable()
    if why:
        print(f"kernel-bench cannot run here: {why}", file=sys.stderr)
        return 1
    load_before = os.getloadavg()[0]
    timings = assets_mod.Timings()
    guest_assets = assets_mod.prepare(timings)
    with timings.part("numba cache (guest)"):
        numba_cache.warm_guest_numba_cache()
    results = Path(tempfile.mkdtemp(prefix="vfiod-kbench-"))
    (results / KERNEL_BENCH_RUNS_FILE).write_text(str(runs))
    benches = [GUEST_RSS_BENCH] if args.rss_only else [GUEST_BENCH, GUEST_RSS_BENCH]
    try:
        run = vm_mod.run_guest(guest_assets, results, [*benches, "-o", "timeout=600", "-s"])
    except vm_mod.VmError as e:
        print(f"kernel-bench: {e}", file=sys.stderr)
        return 1
    rss_file = results / KERNEL_RSS_RESULT_FILE
    rss = rss_summary(json.loads(rss_file.read_text())) if rss_file.exists() else None
    if rss is None:
        print(f"kernel-bench: the guest wrote no RSS figures (exit {run.exit_code})\n"
              f"{run.output}", file=sys.stderr)
    else:
        print(rss_line(rss))
    if args.rss_only:
        if rss is None:
            return 1
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rss_after_migration": rss,
                                   "boot_s": round(run.boot_seconds, 1)}, indent=1))
        print(f"written {out}")
        return 0 if run.exit_code == 0 else 1
    figures = results / KERNEL_BENCH_RESULT_FILE
    if not figures.exists():
        print(f"kernel-bench: the guest wrote no figures (exit {run.exit_code})\n"
              f"{run.output}", file=sys.stderr)
        return 1
    guest = json.loads(figures.read_text())
    if guest["failures"]:
        print("kernel-bench: failed cases:\n  " + "\n  ".join(guest["failures"]),
              file=sys.stderr)
    if not guest["cases"]:
        return 1
    summary = summarize(guest)
    print(table(guest, summary))
    load_after = os.getloadavg()[0]
    print(f"boot {run.boot_seconds:.0f} s, guest bench {run.command_seconds:.0f} s; "
          f"host load average {load_before:.1f} before, {load_after:.1f} after "
          f"({os.cpu_count()} cores)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "boot_s": round(run.boot_seconds, 1),
                                    "guest_s": round(run.command_seconds, 1),
                                    "load_average_1m": [load_before, load_after],
                                    "rss_after_migration": rss, **guest},
                                   indent=1))
    print(f"written {out}")
    return 1 if guest["failures"] or rss is None else 0


if __name__ == "__main__":
    sys.exit(main())
