"""A migration pauses the source VMM and resumes the destination VMM through the guest's
run-state backend (docs/architecture.md §8.2), with real daemon processes and VMMs that
speak the line protocol (docs/runstate-protocol.md). A source VMM that does not
acknowledge the pause in time fails the migration before any device stopped: the
devices are back to RUNNING and the guest runs on the source."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, daemon_pair, guest_status, wait_until
from tests.support.runstate_vmm import LineVmm, QemuQmp
from vfiod.daemon.runstate import QmpRunState

TIMEOUT_S = 0.5


def _config(side: str, vmms: dict[str, str]) -> str:
    """Guest name -> its ``runstate`` spec."""
    start = "running" if side == "source" else "incoming"
    text = "[migration]\n" + ('listen = "127.0.0.1:0"\n' if side == "destination" else "")
    sim = "\n[sim]\n"
    for i, (guest, spec) in enumerate(vmms.items()):
        dev = f"0000:3{i}:00.1" if side == "source" else f"0000:8{i}:00.1"
        text += f'''
[[guest]]
name = "{guest}"
start = "{start}"
memory = "8MiB"
runstate = "{spec}"
runstate_timeout_s = {TIMEOUT_S}
[[guest.device]]
name = "{dev}"
id = "nic0"
'''
        sim += f'[[sim.device]]\nname = "{dev}"\ncapability = "v2_precopy_p2p_log"\n'
    return text + sim


@pytest.fixture(scope="module")
def vmms() -> Iterator[dict[str, LineVmm]]:
    d = Path(tempfile.mkdtemp(prefix="vfiod-vmm-"))
    made = {"src-good": LineVmm(d / "src-good.sock"),
            "src-silent": LineVmm(d / "src-silent.sock", "silent"),
            "dst-good": LineVmm(d / "dst-good.sock", running=False),
            "dst-other": LineVmm(d / "dst-other.sock", running=False)}
    yield made
    for v in made.values():
        v.close()


@pytest.fixture(scope="module")
def pair(vmms) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    src = _config("source", {"good": f"lines:{vmms['src-good'].path}",
                             "stuck": f"lines:{vmms['src-silent'].path}"})
    dst = _config("destination", {"good": f"lines:{vmms['dst-good'].path}",
                                  "stuck": f"lines:{vmms['dst-other'].path}"})
    with daemon_pair(src, dst, "rsrc", "rdst") as daemons:
        yield daemons


def _migrate(src: DaemonProcess, dst: DaemonProcess, guest: str) -> dict:
    r = src.ctl("migrate", guest, "--to", dst.migration_address, "--json")
    return {"rc": r.returncode, "out": r.stdout, "err": r.stderr,
            "final": json.loads(r.stdout.strip().splitlines()[-1]).get("migration", {})
            if r.stdout.strip() else {}}


def test_the_source_vmm_pauses_and_the_destination_vmm_resumes(pair, vmms) -> None:
    src, dst = pair
    assert vmms["src-good"].requests == [] and vmms["dst-good"].requests == []
    m = _migrate(src, dst, "good")
    assert m["rc"] == 0 and m["final"]["result"] == "completed", (m, src.log(), dst.log())
    wait_until(lambda: guest_status(dst, "good")["state"] == "running", 30,
               "good to run on the destination")
    assert [r["op"] for r in vmms["src-good"].requests] == ["pause"]
    assert vmms["src-good"].running is False
    wait_until(lambda: [r["op"] for r in vmms["dst-good"].requests] == ["resume"], 30,
               "the destination VMM to be resumed")
    assert vmms["dst-good"].running is True
    assert "guest good: VMM paused in" in src.log()


def test_a_vmm_that_does_not_pause_in_time_fails_the_migration(pair, vmms) -> None:
    src, dst = pair
    m = _migrate(src, dst, "stuck")
    assert m["rc"] != 0, m
    final = m["final"]
    assert final["result"] == "failed", final
    assert (f"guest stuck: the VMM did not pause within {TIMEOUT_S:g} s" in json.dumps(final)
            ), final
    g = guest_status(src, "stuck")
    assert g["state"] == "running", g
    assert {d["state_label"] for d in g["devices"]} == {"RUNNING"}, g
    # the rollback asked the VMM to resume, too (it stays silent: a warning)
    assert [r["op"] for r in vmms["src-silent"].requests] == ["pause", "resume"]
    wait_until(lambda: guest_status(dst, "stuck")["state"] == "incoming", 30,
               "the destination to wait again")
    assert vmms["dst-other"].requests == []


def test_real_qemus_are_stopped_and_continued_over_qmp(tmp_path: Path) -> None:
    """The source QEMU runs, the destination QEMU waits (-S); after the migration the
    source QEMU is paused and the destination QEMU runs."""
    src_q, dst_q = QemuQmp(tmp_path / "src.qmp"), QemuQmp(tmp_path / "dst.qmp")
    try:
        QmpRunState(src_q.path).resume(time.monotonic() + 10)
        with daemon_pair(_config("source", {"vm": f"qmp:{src_q.path}"}),
                         _config("destination", {"vm": f"qmp:{dst_q.path}"}),
                         "qsrc", "qdst") as (src, dst):
            m = _migrate(src, dst, "vm")
            assert m["rc"] == 0 and m["final"]["result"] == "completed", (m, src.log())
            wait_until(lambda: guest_status(dst, "vm")["state"] == "running", 30,
                       "vm to run on the destination")
            assert "events STOP" in src.log()
        # vfiod left each QMP socket free: the test connects again
        assert QmpRunState(src_q.path).status(time.monotonic() + 10).state == "paused"
        assert QmpRunState(dst_q.path).status(time.monotonic() + 10).state == "running"
    finally:
        src_q.close()
        dst_q.close()
