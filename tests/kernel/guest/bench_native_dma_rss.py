"""``make kernel-bench``, the guest side: a production daemon's memory after a migration on
the real kernel (issue 15 item 4: the fixed part of the daemon's RSS, target 64 MiB). A
benchmark, not a test: the guest suite never collects this file (it is not ``test_*.py``);
tests/kernel/bench.py boots the guest and names it explicitly.

The host's ``rss_after_migration`` (tests/bench/bench_rss.py) can only run ``--backend
sim`` daemons, which hold the simulated kernel and its devices besides vfiod. Here two
``vfiod run --backend linux`` daemons, as a production install runs them (``coverage``
not importable: ``production_env``), migrate one guest whose device is a vfiod_dma mdev
(native/vfiod_dma/README.md) over loopback, as test_native_dma_daemons.py does: the
anonymous RSS of both, idle (READY and one status) and after the migration (the guest
running on the destination, one status each). The JSON goes to the results share.
"""

from __future__ import annotations

import json

from tests.kernel.guest import rig
from tests.kernel.guest.daemon_pair import GUEST, RAM_BYTES, linux_daemon_pair
from tests.kernel.guest.native_dma import DmaControl
from tests.kernel.results import KERNEL_RSS_RESULT_FILE
from tests.support.daemons import wait_until
from tests.support.production_env import anon_rss, coverage_mapped, without_coverage

MiB = 1 << 20
#: the device state: small, as the host bench's 4 devices of the simulator are
STATE_BYTES = 64 * 1024


def _mib(n: int) -> float:
    return round(n / MiB, 2)


def test_kernel_rss_after_migration(native_dma_pair: tuple[str, str],
                                    numba_cache: None) -> None:
    a, b = native_dma_pair
    DmaControl(a).state_size = STATE_BYTES
    DmaControl(b).state_size = 4096
    with without_coverage() as env, linux_daemon_pair(a, b, "rss", seed=5, env=env) as pair:
        p, q = pair.p, pair.q
        for d in (p, q):
            d.call("status")                # the control path once, as any real daemon
        idle = {"source": anon_rss(p.proc.pid), "destination": anon_rss(q.proc.pid)}
        to = q.call("status")["daemon"]["migration_listen"]
        final = dict(p.ctl("migrate", GUEST, "--to", to)["migration"])
        assert (final["result"], final["error"]) == ("completed", None), (final, q.journal())
        wait_until(lambda: q.guest(GUEST)["state"] == "running", 60,
                   f"{GUEST} to run on the destination")
        for d in (p, q):
            d.call("status")                # what an operator asks next
        after = {"source": anon_rss(p.proc.pid), "destination": anon_rss(q.proc.pid)}
        mapped = {d.name: coverage_mapped(d.proc.pid) for d in (p, q)}
    out = {"idle_mib": {k: _mib(v) for k, v in idle.items()},
           "after_mib": {k: _mib(v) for k, v in after.items()},
           "coverage_mapped": mapped, "state_bytes": STATE_BYTES, "ram_bytes": RAM_BYTES}
    (rig.RESULTS / KERNEL_RSS_RESULT_FILE).write_text(json.dumps(out, indent=1))
    assert not any(mapped.values()), f"coverage was loaded: {mapped}"
