"""Scaling of one dirty sync (issue 15 item 4): against RAM size and against dirty fraction,
and the sparse (mdev, pinned scope) sync against the dense one (docs/architecture.md §3).

Every figure is vfiod's own part of ``DirtyTracker.sync()``: the sync's wall time minus the
time spent inside the simulated kernel's ioctls (``bench_sync.KernelClock``), so the
simulator's bitmap production, which a real kernel does differently, is not counted. The
guest is the one of ``bench_sync``: 4 type1 containers of a quarter of the RAM each.

Between two timed syncs the dirty runs are taken (untimed), as a migration's source does
(``SourceSession``: sync, take the pass, send it, sync again), unless a figure says "bits
piling up": then nothing is taken and every sync finds the bits of the ones before it
(the report words' old contents must then be saved and put back, ``report_in_place``).

* ``sync_sparse_vs_dense`` — vfiod's part of the sparse 1 TiB sync (4096 random pages per
  container written by mdev DMA) over the dense one (the same writes by vfio-pci
  devices, which type1 cannot see: every page dirty): the two guests live side by side
  and sync in turn; the median over 5 trials of each trial's best-of-reps ratio.
  Target ≤ 1.0. ``piling_ratio``: the same with bits piling up (another pair).
* ``sync_scaling_ram`` — the dense sync at 1 GiB, 16 GiB, 256 GiB, 1 TiB and 4 TiB (the
  curve is in ``curve_ms``; ``piling_curve_ms`` with bits piling up); value = the largest
  size's time, baseline = the 1 TiB time scaled linearly to that size, ratio ≤ 1 means no
  worse than linear.
* ``sync_scaling_dirty_fraction`` — the mdev sync at ``2^size_log2`` pages with 0, 1e-5,
  1e-3, 0.1 and 1.0 of the pages dirty (runs of up to 64 pages at random places); value =
  the all-dirty time, baseline = the clean time, ratio = how much dirtiness costs.

Run alone: ``.venv/bin/python -m tests.bench.run -k sync_scaling -k sync_sparse``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tests.bench.bench_sync import (
    CONTAINERS,
    PAGE,
    WRITES,
    KernelClock,
    _guest,
    random_writes,
    timed_syncs,
)
from tests.bench.timing import row
from vfiod.kernel.sim.host import SimHost

RAM_LOG2 = (18, 22, 26, 28, 30)            # 1 GiB .. 4 TiB of 4 KiB pages
FRACTIONS = (0.0, 1e-5, 1e-3, 0.1, 1.0)
RUN_PAGES = 64
TRIALS = 5


def _label(pages_log2: int) -> str:
    mib = (1 << pages_log2) * PAGE >> 20
    return (f"{mib >> 20} TiB" if mib >= 1 << 20 else f"{mib >> 10} GiB" if mib >= 1024
            else f"{mib} MiB")


def fraction_writes(size_log2: int, fraction: float, seed: int = 2
                    ) -> Callable[[SimHost], Callable[[], None]]:
    """Set-up making ``fraction`` of each container's pages dirty by mdev DMA, in runs of
    up to RUN_PAGES pages at random run-aligned places (one write for the whole of it at
    1.0)."""
    per_pages = (1 << size_log2) // CONTAINERS
    want = int(per_pages * fraction)
    rng = np.random.default_rng(seed)

    def make(host: SimHost) -> Callable[[], None]:
        devices = [host.device(d.name) for d in host.devices.values()]

        def dirty() -> None:
            for dev in devices:
                if want >= per_pages:
                    dev.dma_write(0, per_pages * PAGE)
                    continue
                run = min(RUN_PAGES, max(1, want))
                slots = per_pages // run
                for s in rng.choice(slots, size=min(slots, want // run), replace=False):
                    dev.dma_write(int(s) * run * PAGE, run * PAGE)
        return dirty
    return make


class _LiveGuest:
    """One 4-container guest of ``bench_sync`` kept alive, synced one sync at a time, so
    the dense and the sparse guest can take turns sync by sync (load drifting on a
    shared machine then hits both sides of a pair alike). Both see the same device
    writes between syncs (``random_writes``): the mdev guest's type1 records them, the
    vfio-pci guest's cannot see them and reports every page."""

    def __init__(self, tmp: str, size_log2: int, mdev: bool, take: bool) -> None:
        self.host, self.containers, self.tracker = _guest(tmp, size_log2, mdev)
        self.clock = KernelClock(self.host)
        self.take = take
        self.dirty = random_writes(self.host, size_log2, WRITES)
        self.pages = 0
        self.tracker.start(initial_all_dirty=False)
        self.tracker.sync("warm-up")            # numba, page faults of the buffers
        if take:
            self.tracker.take_dirty_runs(1024)

    def sync_own(self) -> float:
        """One sync after the untimed device writes; vfiod's part of it, in seconds."""
        self.dirty()
        self.clock.seconds = 0.0
        t0 = time.perf_counter()
        self.pages = self.tracker.sync("precopy").new_dirty_pages
        own = time.perf_counter() - t0 - self.clock.seconds
        if self.take:
            self.tracker.take_dirty_runs(1024)
        return own

    def close(self) -> None:
        self.tracker.stop()
        for c in self.containers:
            c.close()
        self.host.close()


def _pair_trials(size_log2: int, take: bool, reps: int, trials: int
                 ) -> tuple[list[float], list[float], int]:
    """A dense and a sparse guest synced in strict alternation (each sync follows one of
    the other guest), ``reps`` rounds per trial: per trial the best-of-reps vfiod's part
    of each, in ms, and the sparse guest's dirty pages per sync."""
    with tempfile.TemporaryDirectory(prefix="vfiod-bench-sparse-") as tmp:
        dense = _LiveGuest(f"{tmp}/dense", size_log2, mdev=False, take=take)
        sparse = _LiveGuest(f"{tmp}/sparse", size_log2, mdev=True, take=take)
        try:
            dense_ms, sparse_ms = [], []
            for _ in range(trials):
                d, s = [], []
                for _ in range(reps):
                    d.append(dense.sync_own())
                    s.append(sparse.sync_own())
                dense_ms.append(min(d) * 1e3)
                sparse_ms.append(min(s) * 1e3)
            return dense_ms, sparse_ms, sparse.pages
        finally:
            dense.close()
            sparse.close()


def sparse_vs_dense(size_log2: int = 28, reps: int = 5, quick: bool = False) -> dict[str, Any]:
    # A trial's ratio is best-of-reps sparse over best-of-reps dense, the two guests
    # alternating sync by sync; the figure is the median over TRIALS trials.
    reps *= 2                           # a best-of needs more tries on a loaded machine
    trials = 1 if quick else TRIALS
    dense_ms, sparse_ms, pages = _pair_trials(size_log2, True, reps, trials)
    pile_dense, pile_sparse, _ = _pair_trials(size_log2, False, reps, trials)
    ratios = [s / d for s, d in zip(sparse_ms, dense_ms, strict=True)]
    piling = [s / d for s, d in zip(pile_sparse, pile_dense, strict=True)]
    ratio = statistics.median(ratios)
    return row("sync_sparse_vs_dense", statistics.median(sparse_ms), "ms",
               f"vfiod's part of the dense sync of {_label(size_log2)}, same run",
               statistics.median(dense_ms), ratio, target_ratio=1.0, met=ratio <= 1.0,
               trial_ratios=[round(r, 3) for r in ratios],
               sparse_ms=[round(t, 3) for t in sparse_ms],
               dense_ms=[round(t, 3) for t in dense_ms],
               piling_ratio=round(statistics.median(piling), 3),
               piling_trial_ratios=[round(r, 3) for r in piling], dirty_pages_per_sync=pages,
               note="vfiod's own time (sim kernel ioctls excluded), the pass taken between "
                    "syncs; the same device writes before every sync of both guests, their "
                    "syncs alternating; ratio = median over trials of best-of-"
                    f"{reps} sparse / best-of-{reps} dense; lower is better")


def ram_curve(size_log2: int = 28, reps: int = 5, quick: bool = False) -> dict[str, Any]:
    sizes = [s for s in RAM_LOG2 if s <= (size_log2 if quick else max(size_log2, 30))]
    sizes = sizes or [size_log2]
    curve, piling = {}, {}
    for s in sizes:
        _, own, _ = timed_syncs(s, reps, mdev=False, take=True)
        curve[_label(s)] = round(own * 1e3, 3)
        _, own, _ = timed_syncs(s, reps, mdev=False)
        piling[_label(s)] = round(own * 1e3, 3)
    ref = 28 if 28 in sizes else sizes[0]
    top = sizes[-1]
    linear = curve[_label(ref)] * (1 << (top - ref))
    piling_linear = piling[_label(ref)] * (1 << (top - ref))
    return row("sync_scaling_ram", curve[_label(top)], "ms",
               f"the {_label(ref)} sync scaled linearly to {_label(top)}, same run", linear,
               curve[_label(top)] / linear, target_ratio=1.0, curve_ms=curve,
               piling_curve_ms=piling,
               piling_ratio=round(piling[_label(top)] / piling_linear, 3),
               note="dense sync, vfiod's own time, the pass taken between syncs; ratio "
                    f"<= 1: no worse than linear; best of {reps} reps")


def fraction_curve(size_log2: int = 28, reps: int = 5) -> dict[str, Any]:
    curve = {}
    for f in FRACTIONS:
        _, own, _ = timed_syncs(size_log2, reps, mdev=True, take=True,
                                make_dirty=fraction_writes(size_log2, f))
        curve[str(f)] = round(own * 1e3, 3)
    clean, full = curve[str(FRACTIONS[0])], curve[str(FRACTIONS[-1])]
    return row("sync_scaling_dirty_fraction", full, "ms",
               f"the clean sync of {_label(size_log2)} (mdev scope), same run", clean,
               full / clean, curve_ms=curve,
               note="vfiod's own time by dirty fraction; ratio = all dirty / clean; "
                    f"best of {reps} reps")


def benchmarks() -> list[tuple[str, Any]]:
    return [("sync_sparse_vs_dense", sparse_vs_dense), ("sync_scaling_ram", ram_curve),
            ("sync_scaling_dirty_fraction", fraction_curve)]
