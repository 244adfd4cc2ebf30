"""``vfiod demo``: a live migration you can watch, through the product as an operator
assembles it: two ``vfiod run --backend sim`` daemons, one configuration file each, and
``vfiod ctl migrate`` (README "First command"; docs/architecture.md §1 steps 5-8, §6;
both migration protocols, docs/kernel-contract.md §5 and §6, and device DMA logging, §7).

The steps, the processes and the output are described in ``demo_run``, ``demo_procs``
and ``demo_report``; the hosts and the guest in ``demo_setup``. The simulated hosts need
no VFIO and no QEMU. A ``--qemu`` variant (issue 13 item 5: a real VM in two
QEMU processes) would replace only the configurations ``demo_setup`` writes and start the
QEMUs before the daemons.
"""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = """\
Migrate a guest between two vfiod daemons on this machine, exactly as an operator would:
write two configuration files (a simulated host each: guest vm1 with 4 GiB of RAM, three
VFIO devices and a workload dirtying its RAM by device DMA), run `vfiod kernels` (numba's
kernels compiled or loaded, as the systemd unit does first), start two
`vfiod run --backend sim` daemons, wait until both answer, run
`vfiod ctl migrate vm1 --to 127.0.0.1:PORT` against the source while scraping both
daemons' /metrics, ask `vfiod ctl status` where the guest runs now, stop both daemons
(SIGTERM) and remove everything it wrote. No VFIO or QEMU needed."""

EPILOG = """\
output: the commands it runs, as you would type them; the migration's progress (at most
one line a second); then a summary of 16 lines: result, both daemons' pids and ports,
the ctl command, predicted vs actual downtime, pre-copy passes, bytes, the destination's
verification, where the guest runs now (per ctl status), three metric samples from
during the migration and one after it, how the daemons stopped, and the wall time.

--json prints only one JSON object (bounded: at most 8 metric samples): ok, result,
step and reason (the step that failed, if one did), verified, iterations,
predicted_downtime_s, actual_downtime_s, prediction_error, bytes, guest_now,
daemons (pid, control_socket, metrics, migration_listen, stop), commands, metrics
(scrapes, during_migration, samples, after), workdir, kernels (vfiod kernels --json),
timings.

examples:
  vfiod demo                       the whole demo (6-10 s on 2 cores with numba's cache
                                   warm; the first run after an install compiles its
                                   kernels first, about 10 s more)
  vfiod demo --json | jq .actual_downtime_s
  vfiod demo --ram-gib 1 --fill-mib 128 --dirty-mbps 8
  vfiod demo --downtime-limit-ms 50 --timeout 10 --on-timeout cancel
                                   a limit it may not meet: pre-copy runs 10 s, then the
                                   migration is cancelled and the guest stays on the source

exit status: 0 the migration completed, the destination verified it and the guest runs
there; 1 otherwise (a step that failed is named on stderr, with the end of the daemon's
log; no daemon is left running and the temporary directory is removed either way);
2 bad usage."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="migrate a simulated guest between two vfiod daemons with vfiod ctl",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON summary, nothing else")
    p.add_argument("--ram-gib", type=float, default=4.0, help="guest RAM (default 4)")
    p.add_argument("--fill-mib", type=int, default=384,
                   help="RAM filled with data before migrating (default 384)")
    p.add_argument("--dirty-mbps", type=float, default=24.0,
                   help="device DMA write rate into guest RAM, MB/s (default 24)")
    p.add_argument("--bandwidth-mbps", type=float, default=None,
                   help="the source's bandwidth_limit for migrations, MB/s (default: none)")
    p.add_argument("--downtime-limit-ms", type=float, default=300.0,
                   help="vfiod ctl migrate --downtime-limit (default 300)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="vfiod ctl migrate --timeout: seconds of pre-copy before "
                        "--on-timeout applies (default 30)")
    p.add_argument("--on-timeout", choices=("cancel", "force"), default="force",
                   help="vfiod ctl migrate --on-timeout (default force)")
    p.add_argument("--migration-port", type=int, default=0, metavar="PORT",
                   help="the destination daemon's migration port on 127.0.0.1 "
                        "(default 0: a free one)")
    p.add_argument("--seed", type=int, default=1, help="the workload's random seed")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    # imported here: `vfiod --help` should not pay for the demo's modules
    from vfiod.cli.demo_run import run

    return run(args)
