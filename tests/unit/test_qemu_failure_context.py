"""The QEMU tiers' failure report (``tests/support/qemu/guest.py``): a guest that failed
names why, even when the line that says so sits above the console's tail. Seen in a CI
run: a guest whose init died printed its FATAL line, then a kernel panic of 44 lines; the
report's 40-line tail left the FATAL line out, and the test that looks for it failed."""

from __future__ import annotations

from pathlib import Path

from tests.support.qemu.assets import QemuGuestAssets
from tests.support.qemu.guest import QemuGuest


def test_a_fatal_line_above_the_tail_is_in_the_failure_report(tmp_path: Path) -> None:
    vm = QemuGuest(QemuGuestAssets.__new__(QemuGuestAssets), tmp_path / "vm", "vm")
    panic = [f"[    2.44{i:04d}] call trace line {i}" for i in range(44)]
    vm.console_path.write_text("\n".join(
        ["workload: FATAL workload_pages= must be 1..1048576: Invalid argument",
         "[    2.439037] Kernel panic - not syncing: Attempted to kill init!", *panic]) + "\n")
    report = vm.failure_context()
    assert "workload: FATAL workload_pages= must be 1..1048576" in report
    assert "Kernel panic - not syncing" in report
    assert report.endswith("call trace line 43")               # the tail as before
    # a console whose tail holds everything names nothing twice
    vm.console_path.write_text("workload: FATAL bad\nlast line\n")
    assert vm.failure_context().count("workload: FATAL bad") == 1
