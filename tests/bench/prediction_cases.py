"""The regimes of the prediction benchmark, and one migration of a regime
(docs/architecture.md §4; issue 15 item 2).

Each case is a whole migration on the simulated kernel over loopback TCP (through a
token-bucket cap, ``ThrottledLink``, when the regime has one): the source's session in this
process, the destination's in a thread of it or, with ``dest_process``, in a process of
its own (``prediction_dest``), as the benchmark runs it. A regime
says the guest (RAM size, bytes filled), its device (state sizes, PRE_COPY or not, the
pre-copy opt-out), the DMA workload (steady, or bursts of 100 ms on and off) and the
host (a CPU hog beside it). ``run_case`` returns the last prediction before the
switchover, the actual downtime (pause -> the destination's RESUMED), the error, the
floor (bytes left at switchover / the bandwidth measured in this migration, plus one
round trip) and the per-part breakdown.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench.prediction_dest import migrate_to_process
from tests.support.session_rig import (
    MiB,
    SideContainer,
    add_workload,
    build_side,
    migrate,
    pair,
    spec,
)
from vfiod.kernel.sim.workload import DmaTarget
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import SessionConfig
from vfiod.migration.session.history import HOST_HISTORY, SwitchoverHistory
from vfiod.migration.states import GuestState
from vfiod.migration.stream.header import DeviceInfo
from vfiod.vfio import RamRegion

#: the switchovers a guest's migration learns from, by its name and devices
HistoryOf = Callable[[str, tuple[DeviceInfo, ...]], SwitchoverHistory]


@dataclass(frozen=True)
class Regime:
    name: str
    ram_mib: int = 64
    fill_mib: int = 16
    dirty_mbps: float = 0.0
    cap_mbps: float | None = 40.0
    bursty: bool = False
    device: str = "v2_precopy_log"
    state_kib: int = 64
    precopy_kib: int = 128
    opt_out: bool = False          # a second device, opted out, DMAs into its own window
    hog: bool = False
    limit_ms: float = 300.0
    window_mib: int = 16           # where the workload writes


REGIMES = (
    Regime("no_dirtying", cap_mbps=None),
    Regime("tiny_transfer", ram_mib=8, fill_mib=1),
    Regime("steady_capped", dirty_mbps=8.0),
    Regime("steady_uncapped", dirty_mbps=8.0, cap_mbps=None),
    Regime("bursty", dirty_mbps=16.0, bursty=True),
    Regime("near_bandwidth", dirty_mbps=30.0, window_mib=8),
    Regime("big_state_precopy", state_kib=8192, precopy_kib=8192, cap_mbps=80.0),
    Regime("big_state_stop_copy", device="v2_stop_copy_log", state_kib=8192,
           cap_mbps=80.0),
    Regime("opted_out_device", dirty_mbps=4.0, opt_out=True),
    Regime("sparse_1gib", ram_mib=1024, fill_mib=64, dirty_mbps=2.0, cap_mbps=None),
    Regime("sparse_4gib", ram_mib=4096, fill_mib=64, dirty_mbps=2.0, cap_mbps=None),
    Regime("sparse_16gib", ram_mib=16384, fill_mib=64, dirty_mbps=2.0, cap_mbps=None),
    Regime("cpu_hog", dirty_mbps=8.0, hog=True),
    Regime("multi_pass", fill_mib=32, dirty_mbps=8.0, limit_ms=20.0),
)


#: what vfiod adds to a downtime on top of its floor, in the order it happens (issue 15
#: item 3); they add up to actual - floor
OVER_FLOOR_PARTS = ("pause", "p2p_quiesce", "device_reads", "final_sync", "ram_beyond_link",
                    "verify", "journal", "commit_beyond_rtt", "dest_load_resume")


def over_floor_parts(t: dict[str, float], parts: dict[str, float], last: Any,
                     rtt: float) -> dict[str, float]:
    """Milliseconds each step added to the floor (bytes left / bandwidth + one round
    trip): the guest's pause, P2P quiesce, the devices' stop-copy reads beyond their bytes
    over the link, the final sync, the final RAM pass and the stream's end beyond their
    bytes over the link, the final verify, the switchover's journal records (none in the
    bench's unjournaled sessions), the commit's waits beyond one round trip, and the
    destination's load and resume. Negative where a part beat the bandwidth estimate."""
    bw = last.bandwidth_bps
    dev_s = t["device_stop_copy_s"] - t["p2p_quiesce_s"] - last.device_bytes / bw
    added = {"pause": t["pause_s"], "p2p_quiesce": t["p2p_quiesce_s"], "device_reads": dev_s,
             "final_sync": parts["final_sync"],
             "ram_beyond_link": parts["ram_transfer"] - last.dirty_ram_bytes / bw,
             "verify": parts["verify"], "journal": parts["journal"],
             "commit_beyond_rtt": parts["commit_round_trips"] - rtt,
             "dest_load_resume": parts["dest_load_resume"]}
    return {k: round(added[k] * 1000, 3) for k in OVER_FLOOR_PARTS}


@contextmanager
def _hog(on: bool) -> Iterator[None]:
    """A busy process beside the migration (the host's other tenant)."""
    if not on:
        yield
        return
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        p.kill()
        p.wait()


class _Bursts:
    """The workload writes for ``period_s``, rests for ``period_s``, and so on, while the
    guest runs: once it pauses (stop-and-copy) nothing resumes the workload, so the
    guest's memory holds still as a paused guest's does. ``watch`` must be registered as
    a run-state handler before the workload's own."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = True

    def watch(self, old: Any, new: Any) -> None:
        with self.lock:
            self.running = new is GuestState.RUNNING


@contextmanager
def _bursts(wl: Any, gate: _Bursts, on: bool, period_s: float = 0.1) -> Iterator[None]:
    if not on:
        yield
        return
    stop = threading.Event()

    def toggle() -> None:
        while not stop.wait(period_s):
            with gate.lock:
                if not gate.running:
                    continue
                if wl.paused:
                    wl.resume()
                else:
                    wl.pause()
    t = threading.Thread(target=toggle, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def guest_of(r: Regime) -> tuple[list[SideContainer], list[DmaTarget], tuple[RamRegion]]:
    """The regime's containers, the workload's DMA targets and the guest's RAM."""
    dev = spec(r.device, state_size=r.state_kib * 1024, precopy_size=r.precopy_kib * 1024)
    plans = [SideContainer([dev])]
    targets = [DmaTarget(dev.name, 0, r.window_mib * MiB)]
    if r.opt_out:
        opt = spec("v2_stop_copy_log", name="0000:3e:00.3", seed=7)
        win = (r.ram_mib - 16) * MiB
        plans.append(SideContainer([opt], maps=[(win, 16 * MiB)], opt_out=[opt.name]))
        targets.append(DmaTarget(opt.name, win, 16 * MiB))
    return plans, targets, (RamRegion("ram", 0, r.ram_mib * MiB),)


def session_config(r: Regime) -> SessionConfig:
    return SessionConfig(policy=Policy(downtime_limit_s=r.limit_ms / 1000, timeout_s=6.0,
                                       on_timeout="force"), slice_bytes=4 * MiB)


def run_case(root: Path, r: Regime, seed: int, *, dest_process: bool = False,
             history_of: HistoryOf = HOST_HISTORY.of) -> dict[str, Any]:
    """One migration of ``r``; ``dest_process``: the destination in a process of its own
    (``prediction_dest``), as two daemons run, instead of a thread of this one;
    ``history_of(guest, devices)``: the switchovers it learns from (default: this
    process's, as a daemon's)."""
    plans, targets, ram = guest_of(r)
    if dest_process:
        src, dst = build_side(root / "src", "hostA", plans, ram=ram,
                              fill_bytes=r.fill_mib * MiB, seed=seed), None
    else:
        src, dst = pair(root, plans, ram=ram, fill_bytes=r.fill_mib * MiB, seed=seed)
    try:
        wl, gate = None, _Bursts()
        src.guest.add_run_state_handler(gate.watch)
        if r.dirty_mbps:
            wl = add_workload(src, targets, dirty_rate_bps=r.dirty_mbps * 1e6,
                              hot_fraction=0.5, seed=seed + 1)
            wl.start()
            wl.wait_for_writes(1)
        cfg = session_config(r)
        rate = r.cap_mbps * 1e6 if r.cap_mbps else None
        # the process's history: each case learns from the ones before, as a daemon's
        # migrations do
        history = history_of(src.guest.name, src.guest.device_infos())
        with _hog(r.hog), _bursts(wl, gate, r.bursty):
            if dst is None:
                res = migrate_to_process(src, root / "dst", r.name, seed, cfg, rate, history)
            else:
                res = migrate(src, dst, cfg, rate_bps=rate, history=history).source
        if res.result != "completed" or res.prediction_error is None:
            raise RuntimeError(f"{r.name}: {res.result}: {res.reason}")
        last = res.history[-1]
        rtt = res.timings.get("rtt_s", res.timings.get("header_ack_rtt_s", 0.0))
        floor = last.remaining_bytes / last.bandwidth_bps + rtt
        actual = res.actual_downtime_s or 0.0
        parts = {k: v["actual_s"] for k, v in res.downtime_breakdown.items()}
        return {"regime": r.name, "predicted_s": round(res.predicted_downtime_s or 0.0, 5),
                "actual_s": round(actual, 5), "error": round(res.prediction_error, 4),
                "iterations": res.iterations, "forced": last.decision == "force",
                "floor_s": round(floor, 5),
                "queued_bytes": int(res.timings.get("predicted_queued_bytes", 0)),
                # pre-copy's waits for the destination to consume each pass
                "pass_drain_ms": round(res.timings.get("pass_drain_s", 0.0) * 1000, 2),
                "over_floor": round(actual / floor, 3) if floor > 0 else None,
                "breakdown_ms": {k: [round(v["predicted_s"] * 1000, 2),
                                     round(v["actual_s"] * 1000, 2)]
                                 for k, v in res.downtime_breakdown.items()},
                "over_floor_ms": over_floor_parts(res.timings, parts, last, rtt)}
    finally:
        src.close()
        if dst is not None:
            dst.close()
