"""``vfiod run`` freezes its start-up heap (``daemon/main.py`` ``HeapFreeze``, docs/benchmarks.md
§2): once started it collects once and moves what it holds out of the cyclic
collector's full passes, which otherwise stopped every thread of a daemon with 64 guests
for 55-125 ms; the log says how many objects. Only the process's entry point
(``run_daemon``) does it, not ``Daemon.start``, so in-process daemons leave a test
process's collector alone.

An idle daemon makes no numba call (its journal's checksum is ``journal_crc``): numba's
typing registries, 15 MiB and 50,000 objects, come with the first migration, and the
daemon freezes its heap again once they are there."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.support.daemon_configs import host_config
from tests.support.daemons import REPO, DaemonProcess, child_env, guest_status, wait_until

#: A module numba imports at the first call of a kernel (building its typing and
#: lowering registries), never on ``import numba``.
FIRST_CALL_MODULE = "numba.np.arraymath"

_IDLE_PROBE = f"""
import json, sys, tempfile
from pathlib import Path
from tests.support.daemon_configs import host_config
from tests.support.sim_vmm import call, sim_daemon_in_process
with tempfile.TemporaryDirectory() as tmp:
    with sim_daemon_in_process(Path(tmp), host_config("source")) as d:
        call(d, "status")
        print(json.dumps({{"numba": "numba" in sys.modules,
                          "first_call": {FIRST_CALL_MODULE!r} in sys.modules}}))
"""


def test_a_started_daemon_freezes_what_it_holds() -> None:
    d = DaemonProcess(host_config("source"), "heap-freeze")
    try:
        d.wait_ready()
        line = wait_until(lambda: re.search(r"start-up heap frozen: (\d+) objects", d.log()),
                          30, "the daemon to log its frozen heap")
        # the interpreter, numpy, numba's modules and the guests: far more than a bare
        # interpreter
        assert int(line[1]) > 50_000, line[0]
        assert d.call("status", {"guest": "g1"})["guests"][0]["state"] == "running"
    finally:
        d.cleanup()


def test_an_idle_daemon_makes_no_numba_call() -> None:
    out = subprocess.run([sys.executable, "-c", _IDLE_PROBE], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"numba": True, "first_call": False}, out.stderr[-2000:]


def test_the_heap_is_frozen_again_after_the_first_migration() -> None:
    dst = DaemonProcess(host_config("destination"), "heap-dst")
    src = DaemonProcess(host_config("source"), "heap-src")
    try:
        dst.wait_ready()
        src.wait_ready()
        wait_until(lambda: "start-up heap frozen" in src.log(), 30, "the start-up freeze")
        assert "grown heap frozen" not in src.log()
        src.call("migrate", {"guest": "g1", "to": dst.migration_address})
        wait_until(lambda: guest_status(src, "g1")["migration"]["result"], 120,
                   "g1's migration to end")
        line = wait_until(lambda: re.search(r"grown heap frozen: (\d+) objects", src.log()),
                          30, "the source to freeze numba's registries")
        assert int(line[1]) > int(re.search(r"start-up heap frozen: (\d+)", src.log())[1])
    finally:
        src.cleanup()
        dst.cleanup()
