"""``systemd/vfiod-observe.conf`` (README "Observe-only devices", docs/architecture.md
§8.5): the drop-in that lets the hardened unit read debugfs. With it merged into the
unit, ``systemd-analyze verify`` still accepts it and ``systemd-analyze security`` still
rates it "OK"; it adds exactly CAP_DAC_READ_SEARCH (tests/daemon/test_observe_linux_debugfs.py
shows that this capability is what a non-root vfiod needs)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "vfiod.service"
DROP_IN = REPO / "systemd" / "vfiod-observe.conf"


def _settings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith(("#", "["))]


def _merged(tmp_path: Path) -> Path:
    """The unit with the drop-in's [Service] lines added, as systemd merges them."""
    vfiod = Path(sys.executable).parent / "vfiod"
    assert vfiod.exists(), f"{vfiod} missing: install the package into the venv (make venv)"
    unit = re.sub(r"(ExecStart(?:Pre)?=-?)/usr/bin/vfiod", rf"\g<1>{vfiod}", UNIT.read_text())
    drop = DROP_IN.read_text()
    assert drop.count("[Service]") == 1 and "[Install]" not in drop
    out = tmp_path / "vfiod.service"
    out.write_text(unit.replace("\n[Install]", "\n" + "\n".join(_settings(drop))
                                + "\n\n[Install]"))
    return out


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool is not None, "systemd-analyze not installed (Debian package systemd)"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def test_drop_in_adds_only_dac_read_search() -> None:
    assert _settings(DROP_IN.read_text()) == ["AmbientCapabilities=CAP_DAC_READ_SEARCH",
                                              "CapabilityBoundingSet=CAP_DAC_READ_SEARCH"]


def test_unit_with_drop_in_verifies_and_stays_ok(tmp_path: Path) -> None:
    unit = _merged(tmp_path)
    r = _analyze("verify", "--man=no", str(unit))
    assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr
    r = _analyze("security", "--offline=yes", str(unit))
    m = re.search(r"Overall exposure level for vfiod\.service: (\d+\.\d+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0 and m.group(2) == "OK", r.stdout
    # the capability sets merge: CAP_IPC_LOCK stays, CAP_DAC_READ_SEARCH is added
    assert re.search(r"✗ CapabilityBoundingSet=~CAP_\(DAC_\*", r.stdout), r.stdout
    assert re.search(r"✗ CapabilityBoundingSet=~CAP_IPC_LOCK", r.stdout), r.stdout
