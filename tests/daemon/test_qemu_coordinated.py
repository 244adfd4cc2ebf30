"""Two daemons migrate a guest together with the real QEMU that runs its vCPUs
(docs/architecture.md §8.3): ``vfiod ctl migrate`` starts QEMU's own migration, waits
for its pre-switchover stop, moves the device state and the pages the (simulated)
devices wrote into QEMU's RAM file, and the destination QEMU runs only after vfiod's
commit. QEMU runs its firmware only (tests/support/qemu_firmware.py); the device pages
are a range the firmware never touches. QEMU is in .ci/deps: this never skips."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemons import DaemonProcess, daemon_pair, guest_status, wait_until
from tests.support.qemu_daemons import (
    assert_runs_at_home,
    coordinated_config,
    migrate_with_fault,
)
from tests.support.qemu_firmware import FirmwareVm, free_port

MiB = 1 << 20
#: where the simulated device writes: guest-physical [32 MiB, 48 MiB)
SPAN = (32 * MiB, 16 * MiB)


class Rig:
    def __init__(self, workdir: Path, state: str = "") -> None:
        port = free_port()
        self.src_vm = FirmwareVm(workdir, "src")
        self.dst_vm = FirmwareVm(workdir, "dst", incoming_port=port)
        self._pair = daemon_pair(
            coordinated_config("source", "g1", "64MiB", self.src_vm.ram_path,
                               self.src_vm.vfiod_qmp, span=SPAN, dirty_rate="4MiB",
                               state=state),
            coordinated_config("destination", "g1", "64MiB", self.dst_vm.ram_path,
                               self.dst_vm.vfiod_qmp, incoming_port=port, state=state),
            "qsrc", "qdst")
        self.src, self.dst = self._pair.__enter__()

    def close(self) -> None:
        try:
            self._pair.__exit__(None, None, None)
        finally:
            self.src_vm.kill()
            self.dst_vm.kill()

    def logs(self) -> str:
        return self.src.log() + self.dst.log()


@pytest.fixture
def rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(tmp_path, getattr(request, "param", ""))
    try:
        yield r
    finally:
        r.close()


def _migrate(src: DaemonProcess, dst: DaemonProcess) -> dict:
    r = src.ctl("migrate", "g1", "--to", dst.migration_address, "--timeout", "60", "--json")
    return {"rc": r.returncode, "out": r.stdout, "err": r.stderr,
            "final": json.loads(r.stdout.strip().splitlines()[-1])["migration"]
            if r.stdout.strip() else {}}


def test_ctl_migrate_moves_qemus_guest_and_the_devices_pages(rig: Rig) -> None:
    assert rig.src_vm.status() == "running" and rig.dst_vm.status() == "inmigrate"
    wait_until(lambda: any(rig.src_vm.ram(*SPAN)), 30, "the device to write its span")
    m = _migrate(rig.src, rig.dst)
    final = m["final"]
    assert m["rc"] == 0 and final["result"] == "completed", m["out"] + m["err"] + rig.logs()
    assert final["verified"] is True
    # QEMU finished its half: the source stays paused for good, the destination runs
    assert rig.src_vm.status() == "postmigrate"
    assert rig.dst_vm.status() == "running"
    # the device's pages written after QEMU read them arrived through vfiod
    assert rig.dst_vm.ram(*SPAN) == rig.src_vm.ram(*SPAN)
    vmm = final["vmm"]
    assert vmm["completed"]["status"] == "completed" and vmm["completed"]["downtime_s"] > 0
    assert vmm["actual"]["vmm_s"] >= 0 and vmm["actual"]["devices_s"] > 0
    assert final["downtime_s"] == pytest.approx(vmm["actual"]["vmm_s"]
                                                + vmm["actual"]["devices_s"])
    g = wait_until(lambda: (g := guest_status(rig.dst, "g1"))["state"] == "running" and g,
                   30, "g1 to run on the destination")
    assert g["migration"]["result"] == "completed"
    text = rig.src.ctl("status", "g1").stdout
    assert "QEMU share" in text and "devices' share" in text, text
    body = urllib.request.urlopen(f"http://{rig.src.metrics_address}/metrics",
                                  timeout=30).read().decode()
    halves = {(s.labels["half"], s.labels["kind"]): s.value
              for f in text_string_to_metric_families(body) for s in f.samples
              if s.name == "vfiod_migration_downtime_half_seconds"}
    assert halves[("qemu", "actual")] == pytest.approx(vmm["actual"]["vmm_s"])
    assert set(halves) == {(h, k) for h in ("qemu", "devices") for k in ("predicted", "actual")}


def test_the_destination_qemu_killed_mid_migration_leaves_the_source_running(
        rig: Rig) -> None:
    rig.src_vm.query("migrate-set-parameters", **{"max-bandwidth": 8 * MiB})
    final = migrate_with_fault(
        rig.src, rig.dst, "g1", lambda: rig.src_vm.query("query-migrate").get("status")
        == "active", "QEMU's own migration to run", rig.dst_vm.kill)
    assert final.get("result") == "failed", final["diagnostics"]
    assert "QEMU's own migration ended failed" in final["error"], final
    wait_until(lambda: rig.src_vm.status() == "running", 30, "the source VM to run again")
    assert_runs_at_home(rig.src, rig.dst, "g1")


@pytest.mark.parametrize("rig", ["32MiB"], indirect=True)
def test_the_destination_qemu_dying_after_its_own_half_completed_resumes_the_source(
        rig: Rig) -> None:
    """QEMU's half completes first (the source QEMU is then postmigrate, paused for good
    by QEMU's own rules) while vfiod still sends 32 MiB of device state at 64 MiB/s; the
    destination QEMU dies then. vfiod never commits to a guest that cannot run (or, if
    the commit won the race, the destination's failed resume discards it), and the
    source QEMU resumes from postmigrate: one owner, nothing lost."""
    final = migrate_with_fault(rig.src, rig.dst, "g1",
                               lambda: rig.src_vm.status() == "postmigrate",
                               "QEMU's own half to complete", rig.dst_vm.kill)
    assert final.get("result") == "failed", final["diagnostics"]
    wait_until(lambda: rig.src_vm.status() == "running", 30, "the source VM to run again")
    assert_runs_at_home(rig.src, rig.dst, "g1")
