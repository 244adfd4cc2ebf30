"""Stopping a real daemon during a migration (docs/architecture.md §6, daemon/stopping.py):
SIGTERM, SIGTERM twice, and SIGINT in the middle of a pre-copy cancel it; the source's
guest runs again with its devices RUNNING before their fds close (STATUS and the log say
so), the process exits 0 within the stop budget, and the destination discards what it
received and waits again. A stop of the destination instead discards there, and the
source rolls back.

Guest g2's only device has no DMA logging and the source caps its bandwidth, so its
pre-copy never converges (tests/support/daemon_configs.py): it is still in pre-copy
whenever the signal comes. The source runs under a systemd watchdog of 1 s, fed while its
main loop lives; the stop must not read as a wedged loop.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import pytest

from tests.support.daemon_configs import host_config
from tests.support.daemons import (
    DaemonProcess,
    daemon_pair,
    guest_status,
    lifecycle_steps,
    wait_until,
)
from vfiod.daemon.stopping import STOP_BUDGET_S

SIGNALS = {"SIGTERM": [signal.SIGTERM], "SIGTERM twice": [signal.SIGTERM, signal.SIGTERM],
           "SIGINT": [signal.SIGINT]}


@pytest.fixture(scope="module")
def destination() -> Iterator[DaemonProcess]:
    d = DaemonProcess(host_config("destination", guests=("g2",)), "dst-stop")
    try:
        d.wait_ready()
        yield d
    finally:
        d.cleanup()


@pytest.mark.parametrize("signals", SIGNALS.values(), ids=SIGNALS.keys())
def test_a_stop_during_precopy_rolls_back_within_the_budget(
        destination: DaemonProcess, signals: list[signal.Signals]) -> None:
    dst = destination
    src = DaemonProcess(host_config("source", guests=("g2",),
                                    migration='bandwidth_limit = "64MiB"\n'), "src-stop",
                        env={"WATCHDOG_USEC": "1000000"})
    try:
        src.wait_ready()
        src.notify.wait_for("WATCHDOG", timeout=30)
        r = src.ctl("migrate", "g2", "--to", dst.migration_address, "--detach", "--json")
        assert r.returncode == 0, r.stderr
        mid = json.loads(r.stdout)["migration"]["id"]

        def in_precopy() -> bool:
            m = guest_status(src, "g2")["migration"]
            assert m["result"] is None, m
            return bool(m["progress"]["phase"] == "precopy" and m["progress"]["iteration"] >= 1)
        wait_until(in_precopy, 60, "g2's migration to reach pre-copy")
        assert guest_status(dst, "g2")["migration"]["id"] == mid
        n = len(src.notify.messages)
        started = time.monotonic()
        src.signal(signals[0])
        if len(signals) > 1:
            src.notify.wait_for("STOPPING", after=n)
            src.signal(signals[1])                 # while stopping: changes nothing
        assert src.proc.wait(STOP_BUDGET_S) == 0, src.log()
        took = time.monotonic() - started
        assert src.stop() == 0
        log = src.log()
        assert took < STOP_BUDGET_S, (took, log)
        assert "Traceback" not in log, log
        assert log.count(" vfiod: stopping\n") == 1, log       # one stop, not two
        assert f"{signals[0].name} received" in log, log
        assert "(source g2): cancelled" in log, log
        assert "the daemon is shutting down (SIGTERM" in log, log
        assert "cancelled by operator" not in log and "vfiod ctl cancel" not in log, log
        # Back to running before anything closed, its device RUNNING when its fds closed.
        assert lifecycle_steps(src, "g2")[-3:] == [
            ("running", "migrating-out"), ("migrating-out", "running"),
            ("running", "defined")], log
        assert "guest g2: closing (RUNNING); devices: 0000:3d:00.1 RUNNING" in log, log
        assert "left open" not in log and "main loop silent" not in log, log
        said = src.notify.messages[n:]
        stopping = [i for i, m in enumerate(said) if m.get("STOPPING") == "1"]
        assert len(stopping) == 1, said
        said = said[stopping[0]:]
        ended = [m["STATUS"] for m in said if m.get("STATUS", "").startswith(
            "stopping: migrations ended")]
        assert ended and "1 guest(s) (1 running)" in ended[0] and "migrating" not in ended[0]
        assert said[-1].get("STATUS") == "stopped", said

        def dest_ready() -> bool:
            g = guest_status(dst, "g2")
            m = g["migration"]
            return g["state"] == "incoming" and m["id"] == mid and m["result"] is not None
        wait_until(dest_ready, 60, "the destination to discard g2 again")
    finally:
        src.cleanup()


def test_a_stop_of_the_destination_discards_and_the_source_rolls_back() -> None:
    with daemon_pair(host_config("source", guests=("g2",),
                                 migration='bandwidth_limit = "64MiB"\n'),
                     host_config("destination", guests=("g2",)), "src-dstop", "dst-dstop"
                     ) as (src, dst):
        r = src.ctl("migrate", "g2", "--to", dst.migration_address, "--detach", "--json")
        assert r.returncode == 0, r.stderr

        def receiving() -> bool:
            m = guest_status(dst, "g2")["migration"]
            return bool(m is not None and m["result"] is None
                        and m["progress"]["phase"] == "precopy")
        wait_until(receiving, 60, "the destination to receive g2's pre-copy")
        started = time.monotonic()
        dst.signal(signal.SIGTERM)
        assert dst.proc.wait(STOP_BUDGET_S) == 0, dst.log()
        took = time.monotonic() - started
        assert dst.stop() == 0
        log = dst.log()
        assert took < STOP_BUDGET_S, (took, log)
        assert "Traceback" not in log and "left open" not in log, log
        assert "(destination g2): cancelled" in log, log
        assert lifecycle_steps(dst, "g2")[-1] == ("incoming", "defined"), log

        def rolled_back() -> dict | None:
            g = guest_status(src, "g2")
            return g if g["migration"]["result"] is not None else None
        g = wait_until(rolled_back, 60, "the source to end the migration")
        assert g["state"] == "running", (g, src.log())
        assert {d["state_label"] for d in g["devices"]} == {"RUNNING"}
