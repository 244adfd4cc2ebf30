"""Benchmark ``prediction_error_fleet_first``: the first migration of guests that never
switched over, on a host where a guest with the same devices did (issue 15 item 2;
docs/architecture.md §4 "Earlier switchovers").

On a fleet host most guests migrate away once, so most predictions are a guest's first.
For each regime of ``FLEET_REGIMES`` (``prediction_cases``), in this process: a lender
guest migrates once with nothing learnt; then ``GUESTS`` newcomers with the same devices
migrate once each, alternately

* with the host's histories (``HostHistories``: a guest with no switchover of its own
  borrows the lessons of the last guest with its devices), and
* with a history of their own only (a fresh ``SwitchoverHistory``: the former behaviour,
  the baseline, measured in the same run).

Value: the median |predicted - actual| / actual of the newcomers with the host's
histories; baseline: the same without; every case in ``distribution``. Each destination
runs in a process of its own, as in ``bench_prediction``.

Run alone: ``.venv/bin/python -m tests.bench.run -k fleet``.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from tests.bench.prediction_cases import REGIMES, HistoryOf, run_case
from tests.bench.timing import row
from vfiod.migration.session.history import HostHistories, SwitchoverHistory
from vfiod.migration.stream.header import DeviceInfo

#: a large device state, whose stop and load cost time per byte no pre-copy pass shows,
#: and a small one, whose fixed costs are all a history adds
FLEET_REGIMES = ("big_state_precopy", "big_state_stop_copy", "steady_capped")
GUESTS = 3


def _own_only(guest: str, devices: tuple[DeviceInfo, ...]) -> SwitchoverHistory:
    return SwitchoverHistory()


def _host(hosts: HostHistories, name: str) -> HistoryOf:
    """The host's histories, for the guest ``name`` (every case's guest is ``vm1``)."""
    return lambda _guest, devices: hosts.of(name, devices)


def bench_prediction_error_fleet_first(quick: bool = False) -> dict[str, Any]:
    guests = 1 if quick else GUESTS
    regimes = [r for r in REGIMES if r.name in FLEET_REGIMES]
    cases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vfiod-bench-fleet-") as tmp:
        for r in regimes:
            hosts = HostHistories()
            lender = run_case(Path(tmp) / f"{r.name}-lender", r, seed=2, dest_process=True,
                              history_of=_host(hosts, "lender"))
            cases.append({**lender, "guest": "lender", "lessons": "none"})
            for g in range(guests):
                for lessons, of in (("host", _host(hosts, f"guest-{g}")), ("own", _own_only)):
                    c = run_case(Path(tmp) / f"{r.name}-{g}-{lessons}", r, seed=3 + g,
                                 dest_process=True, history_of=of)
                    cases.append({**c, "guest": f"guest-{g}", "lessons": lessons})
    host = [c["error"] for c in cases if c["lessons"] == "host"]
    own = [c["error"] for c in cases if c["lessons"] == "own"]
    med, base = statistics.median(host), statistics.median(own)
    return row("prediction_error_fleet_first", med, "ratio",
               "the same guests learning only from their own switchovers", base,
               med / base if base > 0 else 0.0,
               note=(f"{len(regimes)} regimes x {guests} guests' first migrations after one "
                     "lender guest's, alternating with and without the host's histories"),
               distribution=cases)
