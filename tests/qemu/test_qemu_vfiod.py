"""Two vfiod daemons migrate a running Linux VM from one real QEMU 7.2 to another,
together with its (simulated) device (docs/architecture.md §8.3; issue 13 item 3): the VM
boots the kernel tier's Debian kernel with the workload as init (a counter per page,
tests/support/qemu), the source daemon's device DMA-writes the guest's reserved range
through the RAM file, and ``vfiod ctl migrate`` moves both halves. Afterwards the
destination runs the workload on, its RAM holds the vCPUs' writes and the device's, and
the source QEMU stays paused for good. With the destination QEMU killed during the
migration the source VM runs on and nothing is lost."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tests.support.daemons import DaemonProcess, daemon_pair, guest_status, wait_until
from tests.support.qemu.guest import QemuGuest
from tests.support.qemu.pages import workload_pages, workload_problems
from tests.support.qemu.qmp import QmpClient
from tests.support.qemu_daemons import assert_runs_at_home, coordinated_config, migrate_with_fault

Make = Callable[[str], QemuGuest]
Measure = Callable[[str, float, str], None]
RAM_MIB = 128
BOOT_TIMEOUT = 40.0
STEP_TIMEOUT = 30.0


def _config(side: str, vm: QemuGuest, guest: str = "vm") -> str:
    return coordinated_config(
        side, guest, f"{RAM_MIB}MiB", vm.ram_path or "", str(vm.vfiod_qmp_path),
        incoming_port=vm.incoming_port if side == "destination" else None,
        span=(vm.reserved_gpa, vm.reserved_size))


@contextmanager
def _running_pair(qemu_guests: Make, tmp_path: Path
                  ) -> Iterator[tuple[QemuGuest, QemuGuest, DaemonProcess, DaemonProcess]]:
    src, dst = qemu_guests("src"), qemu_guests("dst")
    src.start(tmp_path / "src.ram", RAM_MIB)
    src.wait_generation_above(0, BOOT_TIMEOUT)
    dst.start(tmp_path / "dst.ram", RAM_MIB, incoming=0)
    with daemon_pair(_config("source", src), _config("destination", dst), "vsrc",
                     "vdst") as (vs, vd):
        yield src, dst, vs, vd


def _span(vm: QemuGuest) -> np.ndarray:
    assert vm.ram_path is not None
    ram = np.memmap(vm.ram_path, dtype=np.uint8, mode="r")
    return np.array(ram[vm.reserved_offset:vm.reserved_offset + vm.reserved_size])


def _status(qmp: QmpClient) -> str:
    return str(qmp.execute("query-status")["status"])


def _final(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])["migration"]


def test_ctl_migrate_moves_a_running_linux_vm_and_its_devices_pages(
        qemu_guests: Make, tmp_path: Path, qemu_measure: Measure) -> None:
    with _running_pair(qemu_guests, tmp_path) as (src, dst, vs, vd):
        wait_until(lambda: _span(src).any(), STEP_TIMEOUT, "the device to write its range")
        r = vs.ctl("migrate", "vm", "--to", vd.migration_address, "--json")
        final = _final(r.stdout)
        assert r.returncode == 0 and final["result"] == "completed", (
            r.stdout + r.stderr + vs.log() + vd.log())
        assert src.qmp is not None and dst.qmp is not None
        # the source QEMU is paused for good; the destination runs the workload on
        source_last = src.last_generation()
        dst.wait_generation_above(source_last + 2, STEP_TIMEOUT)
        assert _status(src.qmp) == "postmigrate"
        assert src.last_generation() == source_last       # never resumed
        # the destination's RAM: every page the vCPUs wrote, at least as new as at the
        # pause, and the device's range exactly as the source's device left it
        assert src.ram_path is not None and dst.ram_path is not None
        at_pause = workload_pages(src.ram_path)
        assert not workload_problems(at_pause, src.work_pages)
        now = workload_pages(dst.ram_path)
        assert set(now) == set(at_pause)
        assert all(now[i] >= at_pause[i] for i in at_pause)
        span = _span(src)
        assert span.any() and np.array_equal(_span(dst), span)
        g = wait_until(lambda: (g := guest_status(vd, "vm"))["state"] == "running" and g,
                       STEP_TIMEOUT, "the guest to run on the destination")
        assert g["migration"]["result"] == "completed"
        vmm = final["vmm"]
        qemu_measure("downtime (end to end)", final["downtime_s"] * 1000, "ms")
        qemu_measure("predicted downtime", final["predicted_downtime_s"] * 1000, "ms")
        qemu_measure("QEMU share", vmm["actual"]["vmm_s"] * 1000, "ms")
        qemu_measure("devices' share", vmm["actual"]["devices_s"] * 1000, "ms")
        qemu_measure("QEMU's own downtime", vmm["completed"]["downtime_s"] * 1000, "ms")
        qemu_measure("QEMU's total time", vmm["completed"]["total_s"] * 1000, "ms")


def test_the_destination_qemu_killed_mid_migration_leaves_the_linux_vm_running_at_home(
        qemu_guests: Make, tmp_path: Path) -> None:
    with _running_pair(qemu_guests, tmp_path) as (src, dst, vs, vd):
        assert src.qmp is not None
        src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 8 << 20})
        final = migrate_with_fault(
            vs, vd, "vm", lambda: src.qmp is not None and src.qmp.execute(
                "query-migrate").get("status") == "active", "QEMU's own migration to run",
            dst.kill)
        assert final.get("result") == "failed", final["diagnostics"]
        assert "QEMU's own migration ended failed" in final["error"]
        # the VM runs on at home: its workload advances, nothing of it was lost
        src.wait_generation_above(src.last_generation() + 2, STEP_TIMEOUT)
        assert _status(src.qmp) == "running"
        assert_runs_at_home(vs, vd, "vm")
        src.qmp.execute("stop")
        assert src.ram_path is not None
        assert not workload_problems(workload_pages(src.ram_path), src.work_pages)
