"""The QEMU VM tier's rig against real QEMU 7.2 (docs/architecture.md §8.3): a VM boots the
Debian kernel with the workload as init, its vCPU's writes are visible in the RAM file,
the reserved device range is left alone by the guest, and a plain QEMU-to-QEMU live
migration with ``pause-before-switchover`` (the coordination vfiod uses) moves the running
workload without losing a write, also when the destination dies on the way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.kernel.assets import REPO
from tests.support.daemons import wait_until
from tests.support.qemu.assets import QemuGuestAssets
from tests.support.qemu.guest import QemuGuest, QemuGuestError
from tests.support.qemu.pages import differing_pages, workload_pages, workload_problems
from tests.support.qemu.qmp import QmpClient, QmpCommandError

Make = Callable[[str], QemuGuest]
Measure = Callable[[str, float, str], None]

BOOT_TIMEOUT = 40.0
STEP_TIMEOUT = 20.0
RESERVED_LINE = r"workload: iomem 0*5000000-0*5ffffff : Reserved"


def boot(guest: QemuGuest, ram: Path, measure: Measure | None = None) -> None:
    """Start ``guest`` and wait for the workload's first generation."""
    guest.start(ram)
    guest.wait_generation_above(0, BOOT_TIMEOUT)
    if measure is not None:
        measure("boot to first generation", time.monotonic() - guest.started_at, "s")


def run_state(qmp: QmpClient) -> tuple[bool, str]:
    status = qmp.execute("query-status")
    return status["running"], status["status"]


def reserved_bytes(guest: QemuGuest) -> np.ndarray:
    assert guest.ram_path is not None
    ram = np.memmap(guest.ram_path, dtype=np.uint8, mode="r")
    return np.array(ram[guest.reserved_offset: guest.reserved_offset + guest.reserved_size])


def write_reserved(guest: QemuGuest, pattern: np.ndarray) -> None:
    """What a simulated device's DMA does: write the reserved range through the file."""
    assert guest.ram_path is not None
    ram = np.memmap(guest.ram_path, dtype=np.uint8, mode="r+")
    ram[guest.reserved_offset: guest.reserved_offset + pattern.size] = pattern
    ram.flush()
    del ram


def stable_pages(guest: QemuGuest) -> dict[int, int]:
    """The workload pages of a guest whose vCPUs are stopped, checked whole."""
    assert guest.ram_path is not None
    pages = workload_pages(guest.ram_path)
    problems = workload_problems(pages, guest.work_pages)
    assert not problems, f"{guest.name}: " + "; ".join(problems)
    return pages


def pattern(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def test_a_booted_vm_runs_the_workload_in_its_ram_file_and_leaves_the_reserved_range_alone(
        qemu_guests: Make, tmp_path: Path, qemu_measure: Measure) -> None:
    vm = qemu_guests("vm")
    boot(vm, tmp_path / "vm.ram", qemu_measure)
    vm.wait_console(RESERVED_LINE, STEP_TIMEOUT)
    assert not reserved_bytes(vm).any(), "the guest wrote into its reserved range"
    first = vm.last_generation()
    vm.wait_generation_above(first + 2, STEP_TIMEOUT)

    # a device's write into the reserved range neither disturbs the guest nor is undone
    dma = pattern(1, 1 << 20)
    write_reserved(vm, dma)
    vm.wait_generation_above(vm.last_generation() + 2, STEP_TIMEOUT)
    assert np.array_equal(reserved_bytes(vm)[:dma.size], dma)

    assert vm.qmp is not None
    vm.qmp.execute("stop")
    assert run_state(vm.qmp) == (False, "paused")
    pages = stable_pages(vm)
    assert min(pages.values()) >= first
    vm.qmp.execute("cont")
    vm.wait_generation_above(max(pages.values()) + 1, STEP_TIMEOUT)


def wait_migration(guest: QemuGuest, statuses: set[str], timeout: float = STEP_TIMEOUT
                   ) -> dict[str, Any]:
    def reached(qmp: QmpClient) -> dict[str, Any] | None:
        info = qmp.execute("query-migrate")
        return info if info.get("status") in statuses else None
    return guest.wait_qmp(reached, timeout, f"query-migrate status in {sorted(statuses)}")


def start_migration(src: QemuGuest, dst: QemuGuest) -> None:
    """What vfiod does before it hands over to QEMU: pause-before-switchover, migrate."""
    assert src.qmp is not None
    src.qmp.execute("migrate-set-capabilities", capabilities=[
        {"capability": "pause-before-switchover", "state": True}])
    src.qmp.execute("migrate", uri=f"tcp:127.0.0.1:{dst.incoming_port}")


def test_a_running_vm_migrates_to_a_paused_destination_and_goes_on_there(
        qemu_guests: Make, tmp_path: Path, qemu_measure: Measure) -> None:
    src, dst = qemu_guests("src"), qemu_guests("dst")
    boot(src, tmp_path / "src.ram", qemu_measure)
    src.wait_generation_above(src.last_generation() + 1, STEP_TIMEOUT)
    dma = pattern(2, 1 << 20)
    write_reserved(src, dma)
    dst.start(tmp_path / "dst.ram", incoming=0)
    assert src.qmp is not None and dst.qmp is not None

    t0 = time.monotonic()
    start_migration(src, dst)
    wait_migration(src, {"pre-switchover"})
    t_pre = time.monotonic()
    assert run_state(src.qmp) == (False, "finish-migrate")
    source_last = src.last_generation()
    src.qmp.execute("migrate-continue", state="pre-switchover")

    # query-migrate can say completed before total-time and downtime are filled in
    done = src.wait_qmp(lambda q: (info := q.execute("query-migrate"))["status"] == "completed"
                        and "downtime" in info and "total-time" in info and info,
                        STEP_TIMEOUT, "completed with total-time and downtime")
    wait_migration(dst, {"completed"})
    dst.wait_qmp(lambda q: run_state(q) == (False, "paused"), STEP_TIMEOUT,
                 "the destination paused after the incoming migration")
    qemu_measure("migrate to pre-switchover (wall)", t_pre - t0, "s")
    qemu_measure("migrate total (wall)", time.monotonic() - t0, "s")
    qemu_measure("QEMU total-time", done["total-time"] / 1000, "s")
    qemu_measure("QEMU downtime", done["downtime"], "ms")
    qemu_measure("RAM transferred", done["ram"]["transferred"] / (1 << 20), "MiB")

    # both stopped: the destination holds exactly what the source's vCPU wrote, and the
    # device's write into the reserved range came along in QEMU's RAM
    src_pages = stable_pages(src)
    assert stable_pages(dst) == src_pages
    assert src.ram_path is not None and dst.ram_path is not None
    assert differing_pages(src.ram_path, dst.ram_path) == []
    assert np.array_equal(reserved_bytes(dst)[:dma.size], dma)

    dst.qmp.execute("cont")
    after = dst.wait_generation_above(source_last, STEP_TIMEOUT)
    dst.wait_generation_above(after + 1, STEP_TIMEOUT)
    assert run_state(dst.qmp) == (True, "running")
    assert dst.ram_path is not None
    moved_on = workload_pages(dst.ram_path)
    assert moved_on.keys() == src_pages.keys()
    assert all(moved_on[i] >= c for i, c in src_pages.items())
    assert max(moved_on.values()) > max(src_pages.values())

    # the source never resumes
    assert run_state(src.qmp) == (False, "postmigrate")
    assert src.last_generation() == source_last
    assert stable_pages(src) == src_pages


@pytest.mark.parametrize("when, then, ends", [
    ("active", None, "failed"),
    ("pre-switchover", "migrate-continue", "failed"),
    ("pre-switchover", "migrate_cancel", "cancelled"),
])
def test_the_source_resumes_with_nothing_lost_when_the_destination_dies_mid_migration(
        qemu_guests: Make, tmp_path: Path, qemu_measure: Measure, when: str,
        then: str | None, ends: str) -> None:
    src, dst = qemu_guests("src"), qemu_guests("dst")
    boot(src, tmp_path / "src.ram")
    dst.start(tmp_path / "dst.ram", incoming=0)
    assert src.qmp is not None
    before: dict[int, int] = {}
    if when == "active":
        # a capped link keeps the first pass busy for seconds: killed while RAM flows
        src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 8 << 20})
        start_migration(src, dst)
        src.wait_qmp(lambda q: q.execute("query-migrate").get("ram", {})
                     .get("transferred", 0) > 2 << 20, STEP_TIMEOUT, "2 MiB sent")
        assert src.qmp.execute("query-migrate")["status"] == "active"
    else:
        start_migration(src, dst)
        wait_migration(src, {"pre-switchover"})
        before = stable_pages(src)
    last = src.last_generation()
    dst.kill()
    t_kill = time.monotonic()
    if then is not None:
        # QEMU does not notice a dead destination while it waits in pre-switchover: the
        # source stays stopped until told to continue (the send then fails) or to cancel
        assert src.qmp.execute("query-migrate")["status"] == "pre-switchover"
        src.qmp.execute(then, **({"state": "pre-switchover"} if then == "migrate-continue"
                                 else {}))
    wait_migration(src, {ends})
    src.wait_qmp(lambda q: run_state(q) == (True, "running"), STEP_TIMEOUT,
                 "the source running again")
    src.wait_generation_above(last + 1, STEP_TIMEOUT)
    qemu_measure(f"destination killed to source running ({when}, {then})",
                 time.monotonic() - t_kill, "s")

    src.qmp.execute("stop")
    after = stable_pages(src)
    assert min(after.values()) > max([last, *before.values()])
    src.qmp.execute("cont")
    src.wait_generation_above(max(after.values()) + 1, STEP_TIMEOUT)


def test_a_guest_whose_init_dies_fails_the_wait_at_once_with_its_console(
        qemu_guests: Make, tmp_path: Path) -> None:
    vm = qemu_guests("vm")
    vm.start(tmp_path / "vm.ram", work_pages=0)     # the workload refuses 0 pages
    t0 = time.monotonic()
    with pytest.raises(QemuGuestError) as failed:
        vm.wait_generation_above(0, BOOT_TIMEOUT)
    assert "exited" in str(failed.value)
    assert "workload: FATAL workload_pages= must be 1..1048576" in str(failed.value)
    assert time.monotonic() - t0 < BOOT_TIMEOUT
    assert not vm.alive()


def test_a_qmp_command_qemu_refuses_raises_naming_it(qemu_guests: Make,
                                                    tmp_path: Path) -> None:
    vm = qemu_guests("vm")
    vm.start(tmp_path / "vm.ram", paused=True)
    assert vm.qmp is not None
    assert run_state(vm.qmp) == (False, "prelaunch")
    with pytest.raises(QmpCommandError, match="migrate-continue: GenericError"):
        vm.qmp.execute("migrate-continue", state="pre-switchover")
    vm.qmp.execute("cont")
    vm.wait_generation_above(0, BOOT_TIMEOUT)


def test_no_qemu_outlives_the_process_that_started_it(qemu_guest_assets: QemuGuestAssets,
                                                      tmp_path: Path) -> None:
    """A test run killed outright (SIGKILL, pytest-timeout) leaves no QEMU running."""
    script = (
        "import sys\nfrom pathlib import Path\n"
        "from tests.support.qemu.assets import QemuGuestAssets\n"
        "from tests.support.qemu.guest import QemuGuest\n"
        "a = QemuGuestAssets(Path(sys.argv[1]), Path(sys.argv[2]), 'r')\n"
        "g = QemuGuest(a, Path(sys.argv[3]), 'orphan')\n"
        "g.start(Path(sys.argv[3]) / 'ram', paused=True)\n"
        "print(g.proc.pid, flush=True)\n"
        "sys.stdin.read()\n")
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(qemu_guest_assets.vmlinuz),
         str(qemu_guest_assets.initramfs), str(tmp_path / "orphan")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert parent.stdout is not None
        qemu_pid = int(parent.stdout.readline())
        assert Path(f"/proc/{qemu_pid}").exists()
    finally:
        parent.kill()
        parent.wait()
    wait_until(lambda: process_gone(qemu_pid), 10, "the orphaned QEMU to die")


def process_gone(pid: int) -> bool:
    """No such process, or only its zombie (reaped by whoever adopted it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"
