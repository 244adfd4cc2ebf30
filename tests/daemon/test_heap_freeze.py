"""``vfiod run`` freezes its start-up heap (``daemon/main.py`` ``freeze_startup_heap``,
README "Scaling"): once started it collects once and moves what it holds out of the
cyclic collector's full passes, which otherwise stopped every thread of a daemon with 64
guests for 55-125 ms; the log says how many objects. Only the process's entry point
(``run_daemon``) does it, not ``Daemon.start``, so in-process daemons leave a test
process's collector alone."""

from __future__ import annotations

import re

from tests.support.daemon_configs import host_config
from tests.support.daemons import DaemonProcess, wait_until


def test_a_started_daemon_freezes_what_it_holds() -> None:
    d = DaemonProcess(host_config("source"), "heap-freeze")
    try:
        d.wait_ready()
        line = wait_until(lambda: re.search(r"start-up heap frozen: (\d+) objects", d.log()),
                          30, "the daemon to log its frozen heap")
        # the interpreter, numpy, numba and the guests: far more than a bare interpreter
        assert int(line[1]) > 50_000, line[0]
        assert d.call("status", {"guest": "g1"})["guests"][0]["state"] == "running"
    finally:
        d.cleanup()
