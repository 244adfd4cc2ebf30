"""``make demo-qemu`` (tests/qemu/demo.py): the real-VM migration through two daemons ends
ok and prints a bounded summary that says both halves of the downtime (issue 13 item 5)."""

from __future__ import annotations

import subprocess
import sys

from tests.kernel.assets import REPO
from tests.qemu.demo import SAMPLES
from tests.support.daemons import child_env


def test_demo_qemu_migrates_the_vm_and_prints_a_bounded_summary() -> None:
    r = subprocess.run([sys.executable, "-m", "tests.qemu.demo"], cwd=REPO, env=child_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) <= 9 + SAMPLES, r.stdout
    assert lines[0].startswith("result        completed (ok)")
    text = r.stdout
    assert "QEMU share" in text and "devices" in text
    assert "'source': 'postmigrate', 'destination': 'running'" in text
    assert "device range equal: True" in text and "at least as new: True" in text
