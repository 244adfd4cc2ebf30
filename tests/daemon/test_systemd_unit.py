"""The systemd unit (docs/architecture.md §6): ``systemd-analyze verify`` accepts it, and
``systemd-analyze security --offline=yes`` rates its exposure at most 2.0 ("OK") while
keeping what VFIO needs (device allow-list, CAP_IPC_LOCK, no PrivateDevices, W+X for numba).

The unit is copied to a temporary directory with ExecStart pointing at this venv's
``vfiod`` (verify checks that the binary exists). ``--man=no``: the unit's
``Documentation=man:vfiod(8)`` names a page a package installs, not this checkout.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "vfiod.service"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed "
                                "(Debian package systemd)")


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    vfiod = Path(sys.executable).parent / "vfiod"
    if not vfiod.exists():
        pytest.skip(f"{vfiod} missing: install the package into the venv (make venv)")
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/vfiod run" in text
    out = tmp_path / "vfiod.service"
    out.write_text(re.sub(r"(ExecStart(?:Pre)?=-?)/usr/bin/vfiod", rf"\g<1>{vfiod}", text))
    return out


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=120)


def test_unit_verifies(unit: Path) -> None:
    r = _analyze("verify", "--man=no", str(unit))
    assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr


def test_unit_verify_catches_a_broken_unit(unit: Path) -> None:
    # The check can fail: a missing binary is reported.
    unit.write_text(re.sub(r"ExecStart=\S+", "ExecStart=/nonexistent/vfiod", unit.read_text()))
    r = _analyze("verify", "--man=no", str(unit))
    assert r.returncode != 0 and "/nonexistent/vfiod" in r.stderr


def test_exposure_is_ok(unit: Path) -> None:
    r = _analyze("security", "--offline=yes", str(unit))
    m = re.search(r"Overall exposure level for vfiod\.service: (\d+\.\d+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    score, verdict = float(m.group(1)), m.group(2)
    assert score <= 2.0 and verdict == "OK", r.stdout


def test_unit_keeps_what_vfio_needs() -> None:
    text = UNIT.read_text()
    lines = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in text.splitlines()
             if "=" in line and not line.startswith("#")}
    assert lines["Type"] == "notify" and "WatchdogSec" in lines
    assert "PrivateDevices" not in lines                 # it would hide /dev/vfio
    assert lines["DevicePolicy"] == "closed"
    assert "DeviceAllow=char-vfio rw" in text and "DeviceAllow=/dev/vfio/vfio rw" in text
    assert lines["AmbientCapabilities"] == "CAP_IPC_LOCK"
    assert lines["LimitMEMLOCK"] == "infinity"
    assert lines["MemoryDenyWriteExecute"] == "no"       # numba's JIT maps W+X memory
    assert lines["Environment"].startswith("NUMBA_CACHE_DIR=/var/cache/vfiod")
    assert "AF_UNIX" in lines["RestrictAddressFamilies"]  # the control socket


def test_unit_fills_numbas_cache_before_the_daemon_starts() -> None:
    # the daemon's first migration after an install or an upgrade must not compile its
    # kernels (tests/daemon/test_kernels_cmd.py); a failure must not stop the daemon
    text = UNIT.read_text()
    service = [line for line in text.splitlines() if line and not line.startswith("#")]
    pre = [line for line in service if line.startswith("ExecStartPre=")]
    assert pre == ["ExecStartPre=-/usr/bin/vfiod kernels"]
    assert service.index(pre[0]) < service.index(
        next(line for line in service if line.startswith("ExecStart=")))
    # both run with the unit's one Environment=, so they share the cache
    assert "Environment=NUMBA_CACHE_DIR=/var/cache/vfiod/numba" in service
