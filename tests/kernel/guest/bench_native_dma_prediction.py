"""``make kernel-bench``, the guest side: how well vfiod predicts the downtime of a real
kernel's migration (issue 14; docs/architecture.md §4 "fixed costs measured on this
path"). A benchmark, not a test: the guest suite never collects this file (it is not
``test_*.py``); tests/kernel/bench.py boots the guest and names it explicitly.

Every case migrates one vfiod_dma device (native/vfiod_dma/README.md) with its guest's
RAM through vfiod's migration session over loopback TCP, as
test_native_dma_migration.py does: a device state of a given size, the device's
background DMA writer at a given rate during pre-copy, the link uncapped or through a
``ThrottledLink``. The first migration of this process uses a fresh
``SwitchoverHistory``: a fresh daemon's first prediction. The matrix then shares one
history, as a daemon's migrations learn from the ones before them. Each case reports the
last prediction before the switchover, the measured downtime (pause -> the destination's
RESUMED) and |predicted - actual| / actual; the JSON goes to the results share.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from tests.kernel.guest import rig
from tests.kernel.guest.native_dma import DmaControl
from tests.kernel.guest.test_migration_session import Side, side_pair
from tests.kernel.results import KERNEL_BENCH_RESULT_FILE, KERNEL_BENCH_RUNS_FILE
from vfiod.kernel.linux import LinuxKernel
from vfiod.migration.planning.hostfacts import gather_host_facts
from vfiod.migration.planning.predictor import DEFAULT_DOWNTIME_LIMIT_S, Policy
from vfiod.migration.session.common import MigrationResult, SessionConfig
from vfiod.migration.session.dest import DestinationSession
from vfiod.migration.session.history import SwitchoverHistory
from vfiod.migration.session.link import ThrottledLink
from vfiod.migration.session.source import SourceSession
from vfiod.migration.transport import Listener, connect
from vfiod.vfio import HostPaths

PAGE = 4096
KiB = 1 << 10
MiB = 1 << 20
DEADLINE_S = 60.0
#: the writer rewrites these pages of the 4 MiB guest RAM, in turn
WRITER_IOVA = 512 * PAGE
WRITER_PAGES = 256


@dataclass(frozen=True)
class KernelBenchCase:
    state_bytes: int
    writer_pages_s: int
    cap_bps: float | None

    @property
    def name(self) -> str:
        cap = "uncapped" if self.cap_bps is None else f"cap{self.cap_bps / 1e6:g}MBps"
        return f"state{self.state_bytes // KiB}KiB_dma{self.writer_pages_s}ps_{cap}"


def matrix_from_host() -> tuple[list[KernelBenchCase], int]:
    """The matrix and the runs per case, which the host wrote to the results share
    (``KERNEL_BENCH_RUNS_FILE``; tests/kernel/bench.py: ``VFIOD_KBENCH_RUNS``); 3 without it."""
    runs_file = rig.RESULTS / KERNEL_BENCH_RUNS_FILE
    runs = int(runs_file.read_text()) if runs_file.exists() else 3
    cases = [KernelBenchCase(size, rate, cap)
             for size in (256 * KiB, 4 * MiB, 16 * MiB)
             for rate in (0, 300)
             for cap in (None, 32e6)]
    return cases, runs


def migrate_case(src: Side, dst: Side, cap_bps: float | None,
                 history: SwitchoverHistory) -> MigrationResult:
    """One migration over loopback TCP, capped when ``cap_bps`` is set; the destination
    session runs in a thread."""
    rig.loopback_up()
    # the daemon's default limit: the switchover comes when the prediction says it fits,
    # where the prediction matters (a generous limit switches over after the first pass,
    # leaving pre-copy data of a large state to the stop); forced if pre-copy drags on
    config = SessionConfig(ack_timeout_s=DEADLINE_S,
                           policy=Policy(downtime_limit_s=DEFAULT_DOWNTIME_LIMIT_S,
                                         timeout_s=20.0, on_timeout="force"))
    box: dict[str, Any] = {}
    with Listener("127.0.0.1", 0) as lst:
        def destination() -> None:
            try:
                with lst.accept(timeout=DEADLINE_S) as conn:
                    box["result"] = DestinationSession(dst.guest, conn, host=dst.facts,
                                                       config=config).run()
            except BaseException as e:  # noqa: BLE001 - reported by the caller
                box["error"] = e

        t = threading.Thread(target=destination, name="kbench-destination")
        t.start()
        try:
            with connect("127.0.0.1", lst.address[1], timeout=DEADLINE_S) as conn:
                link = conn if cap_bps is None else ThrottledLink(conn, cap_bps)
                res = SourceSession(src.guest, link, host=src.facts, config=config,
                                    history=history).run()
        finally:
            t.join(DEADLINE_S)
    if t.is_alive() or "error" in box:
        raise RuntimeError(f"destination session: {box.get('error', 'did not end')!r}")
    return res


def run_one(kernel: LinuxKernel, paths: HostPaths, pair: tuple[str, str],
            case: KernelBenchCase, history: SwitchoverHistory, seed: int) -> dict[str, Any]:
    facts = gather_host_facts(kernel)
    with side_pair(kernel, paths, ("kbench-src", "kbench-dst"), pair, facts) as (src, dst):
        sctl, dctl = DmaControl(src.dev.name), DmaControl(dst.dev.name)
        sctl.state_size = case.state_bytes
        sctl.fill(seed=seed)
        dctl.state_size = 64 * KiB
        if case.writer_pages_s:
            sctl.start_writer(rate=case.writer_pages_s, pattern=seed & 0x7F,
                              iova=WRITER_IOVA, pages=WRITER_PAGES)
        t0 = time.monotonic()
        res = migrate_case(src, dst, case.cap_bps, history)
        wall = time.monotonic() - t0
        # what the device handed out before and after the stop: the state's share of
        # the downtime
        mig = sctl.mig_stats()
    if res.result != "completed" or res.prediction_error is None:
        raise RuntimeError(f"{case.name}: {res.result}: {res.reason}")
    return {"case": case.name, "state_bytes": case.state_bytes,
            "writer_pages_s": case.writer_pages_s, "cap_bps": case.cap_bps,
            "predicted_s": round(res.predicted_downtime_s or 0.0, 5),
            "actual_s": round(res.actual_downtime_s or 0.0, 5),
            "error": round(res.prediction_error, 4), "iterations": res.iterations,
            "forced": res.history[-1].decision == "force" if res.history else False,
            "migration_s": round(wall, 2), "precopy_bytes": mig["precopy_bytes"],
            "stopcopy_bytes": mig["stopcopy_bytes"],
            "breakdown_ms": {k: [round(v["predicted_s"] * 1000, 2),
                                 round(v["actual_s"] * 1000, 2)]
                             for k, v in res.downtime_breakdown.items()}}


def test_kernel_prediction_matrix(kernel: LinuxKernel, paths: HostPaths,
                                  native_dma_pair: tuple[str, str],
                                  numba_cache: None) -> None:
    cases, runs = matrix_from_host()
    # this process has migrated nothing yet: its first prediction is a fresh daemon's
    first = run_one(kernel, paths, native_dma_pair, cases[0], SwitchoverHistory(), seed=1)
    history = SwitchoverHistory()
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for run in range(runs):
        for i, case in enumerate(cases):
            try:
                rows.append(run_one(kernel, paths, native_dma_pair, case, history,
                                    seed=2 + run * len(cases) + i) | {"run": run})
            except Exception as e:  # noqa: BLE001 - one failed case must not hide the rest
                failures.append(f"{case.name} run {run}: {e!r}")
    out = {"fresh_first": first, "cases": rows, "failures": failures, "runs": runs}
    (rig.RESULTS / KERNEL_BENCH_RESULT_FILE).write_text(json.dumps(out, indent=1))
    if failures or not rows:
        pytest.fail("cases failed: " + "; ".join(failures), pytrace=False)
