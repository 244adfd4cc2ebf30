"""``vfiod demo``: a live migration you can watch, on the simulated kernel, between two
vfiod processes over loopback TCP (README "First command"; docs/architecture.md §1, §4, §5; both
migration protocols, docs/kernel-contract.md §5 and §6, and device DMA logging, §7).

The source process builds a simulated host and guest (``demo_setup``), fills part of the
guest's RAM with data (the rest of the sparse memfds stays never-written), starts a
workload that writes guest RAM by device DMA at ``--dirty-mbps``, starts the destination
as a second process (``vfiod demo --role destination``, which prints its port), connects
and migrates, printing progress lines (at most one a second, each saying how many passes
it stands for; the first and the deciding pass always show). Afterwards, out of the downtime
window, both processes hash all of their guest RAM and their device states and the source
compares them: the end-to-end proof that the dirty tracking lost nothing.

``--json`` prints one JSON object instead (keys include ``result``, ``iterations``,
``predicted_downtime_s``, ``actual_downtime_s``, ``verified``; ``history`` keeps the last
40 passes and ``history_omitted`` counts the rest, so the object stays well under 64 KiB). Exit status 0 when the
migration completed and everything verified, 1 otherwise.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="migrate a simulated guest between two processes over loopback",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON summary")
    p.add_argument("--ram-gib", type=float, default=4.0, help="guest RAM (default 4)")
    p.add_argument("--fill-mib", type=int, default=384,
                   help="RAM filled with data before migrating (default 384)")
    p.add_argument("--dirty-mbps", type=float, default=24.0,
                   help="device DMA write rate into guest RAM, MB/s (default 24)")
    p.add_argument("--bandwidth-mbps", type=float, default=None,
                   help="cap the migration stream at this rate, MB/s (default: none)")
    p.add_argument("--downtime-limit-ms", type=float, default=300.0)
    p.add_argument("--max-iterations", type=int, default=None)
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds of pre-copy before --on-timeout applies (default 30)")
    p.add_argument("--on-timeout", choices=("cancel", "force"), default="force")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--role", choices=("source", "destination"), default="source",
                   help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(handler=_run)



def _run(args: argparse.Namespace) -> int:
    # imported here: the demo pulls in numba and the simulator, which `vfiod ctl` and
    # `vfiod --help` should not pay for
    from vfiod.cli.demo_run import run

    return run(args)
