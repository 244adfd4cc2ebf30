"""Benchmark ``prediction_error_after_restart``: a guest's first migration after its
daemon restarted (issue 15 item 2; docs/architecture.md §1.8, §4 "Earlier switchovers").

A restart (an upgrade, a reload of the unit) used to forget every switchover the daemon
had learnt from, so its next prediction was a host's first. For each regime of
``FLEET_REGIMES`` (``bench_fleet_first``), in this process: the guest migrates once with
a ``HistoryStore`` over a directory, which saves its histories as the daemon does; then,
``ROUNDS`` times, alternately, the same guest migrates once more

* with the histories the store reads back from the file (a restarted daemon now), and
* with empty histories (a restarted daemon before: the baseline, in the same run).

Every migration after the first starts from the file as saved after the first, so each
is the first after a restart. Value: the median |predicted - actual| / actual of the
migrations with the file; baseline: the same without; every case in ``distribution``.
Each destination runs in a process of its own, as in ``bench_prediction``. The restart
is the store's file; the process stays warm (``prediction_error_first`` measures a fresh
process's one-off costs, which the rehearsal covers).

Run alone: ``.venv/bin/python -m tests.bench.run -k restart``.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from tests.bench.bench_fleet_first import FLEET_REGIMES
from tests.bench.prediction_cases import REGIMES, HistoryOf, run_case
from tests.bench.timing import row
from vfiod.daemon.history_store import HistoryStore
from vfiod.migration.session.history import HostHistories

ROUNDS = 3


def _of(store: HistoryStore) -> HistoryOf:
    return lambda guest, devices: store.of(guest, devices)


def bench_prediction_error_after_restart(quick: bool = False) -> dict[str, Any]:
    rounds = 1 if quick else ROUNDS
    regimes = [r for r in REGIMES if r.name in FLEET_REGIMES]
    cases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vfiod-bench-restart-") as tmp:
        for r in regimes:
            state = Path(tmp) / f"{r.name}-state"
            state.mkdir()
            before = HistoryStore.open(str(state))
            first = run_case(Path(tmp) / f"{r.name}-first", r, seed=2, dest_process=True,
                             history_of=_of(before))
            if not before.save():
                raise RuntimeError(f"{r.name}: the histories were not saved")
            cases.append({**first, "migration": "before the restart", "lessons": "none"})
            for n in range(rounds):
                for lessons in ("file", "none"):
                    store = (HistoryStore.open(str(state)) if lessons == "file"
                             else HistoryStore(HostHistories()))
                    if store.warning:
                        raise RuntimeError(f"{r.name}: {store.warning}")
                    c = run_case(Path(tmp) / f"{r.name}-{n}-{lessons}", r, seed=3 + n,
                                 dest_process=True, history_of=_of(store))
                    cases.append({**c, "migration": f"after restart {n + 1}",
                                  "lessons": lessons})
    kept = [c["error"] for c in cases if c["lessons"] == "file"]
    lost = [c["error"] for c in cases if c["migration"] != "before the restart"
            and c["lessons"] == "none"]
    med, base = statistics.median(kept), statistics.median(lost)
    return row("prediction_error_after_restart", med, "ratio",
               "the same migrations after a restart that kept no history", base,
               med / base if base > 0 else 0.0,
               note=(f"{len(regimes)} regimes x {rounds} first migrations after a restart, "
                     "alternating with and without the saved histories"),
               distribution=cases)
