"""Downtime prediction error: |predicted - actual| / actual over a matrix of guest dirty
rates and link bandwidth caps (docs/architecture.md §4).

Each case is a whole migration on the simulated kernel, in this process: a 64 MiB guest
(16 MiB of data) with a v2+PRE_COPY device whose DMA dirties a 16 MiB window at the given
rate, migrated over loopback TCP through a token-bucket cap (``ThrottledLink``). The
prediction is the last one before switchover; the actual downtime runs from the guest's
pause to the destination's acknowledgement. Rows: ``prediction_error_median`` and
``prediction_error_p90`` (target: median <= 0.15), with every case in ``distribution``.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from tests.bench.timing import row
from tests.support.session_rig import (
    MiB,
    SideContainer,
    add_workload,
    migrate,
    pair,
    spec,
)
from vfiod.kernel.sim.workload import DmaTarget
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import SessionConfig
from vfiod.vfio import RamRegion

TARGET = 0.15
CAPS_MBPS = (20.0, 40.0, 80.0)
DIRTY_MBPS = (2.0, 5.0, 10.0)


def one_case(root: Path, dirty_mbps: float, cap_mbps: float) -> dict[str, Any]:
    dev = spec("v2_precopy_log", state_size=64 * 1024, precopy_size=128 * 1024)
    src, dst = pair(root, [SideContainer([dev])], ram=(RamRegion("ram", 0, 64 * MiB),),
                    fill_bytes=16 * MiB, seed=2)
    try:
        wl = add_workload(src, [DmaTarget(dev.name, 0, 16 * MiB)],
                          dirty_rate_bps=dirty_mbps * 1e6, hot_fraction=0.5, seed=3)
        wl.start()
        wl.wait_for_writes(1)
        cfg = SessionConfig(policy=Policy(downtime_limit_s=0.3, timeout_s=8.0,
                                          on_timeout="force"), slice_bytes=4 * MiB)
        run = migrate(src, dst, cfg, rate_bps=cap_mbps * 1e6)
        r = run.source
        if r.result != "completed" or r.prediction_error is None:
            raise RuntimeError(f"case dirty {dirty_mbps} MB/s cap {cap_mbps} MB/s: "
                               f"{r.result}: {r.reason}")
        return {"dirty_mbps": dirty_mbps, "cap_mbps": cap_mbps,
                "predicted_s": round(r.predicted_downtime_s or 0.0, 4),
                "actual_s": round(r.actual_downtime_s or 0.0, 4),
                "error": round(r.prediction_error, 4), "iterations": r.iterations,
                "forced": r.history[-1].decision == "force"}
    finally:
        src.close()
        dst.close()


def _p90(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]


def bench_prediction_error(quick: bool = False) -> list[dict[str, Any]]:
    caps = CAPS_MBPS[1:] if quick else CAPS_MBPS
    rates = DIRTY_MBPS[:2] if quick else DIRTY_MBPS
    cases = []
    with tempfile.TemporaryDirectory(prefix="vfiod-bench-pred-") as tmp:
        for i, cap in enumerate(caps):
            for j, rate in enumerate(rates):
                cases.append(one_case(Path(tmp) / f"{i}-{j}", rate, cap))
    errors = [c["error"] for c in cases]
    med, p90 = statistics.median(errors), _p90(errors)
    note = f"{len(cases)} migrations: dirty {list(rates)} MB/s x cap {list(caps)} MB/s"
    return [
        row("prediction_error_median", med, "ratio", "target", TARGET, med / TARGET,
            target_ratio=1.0, note=note, distribution=cases),
        row("prediction_error_p90", p90, "ratio", "target", TARGET, p90 / TARGET,
            note=note, distribution=sorted(errors)),
    ]
