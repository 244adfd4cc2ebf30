"""``make test`` does its own set-up (README "Test"): the Debian packages the tiers need
are listed once (.ci/deps, which .ci/run and the Makefile both use); as root the missing
ones are installed before testing; otherwise nothing is tested and the one command to
run is printed; and a skipped test fails ``make test`` (tests/support/no_skips.py).

The package manager is faked on PATH (``dpkg -s`` fails for the packages in
$FAKE_MISSING, ``apt-get`` logs its arguments, ``id -u`` prints $FAKE_UID), so these run
as any user and install nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support.daemons import REPO

DEPS = REPO / ".ci" / "deps"


def _fake_bin(tmp_path: Path) -> Path:
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    scripts = {
        "dpkg": 'for p in $FAKE_MISSING; do [ "$2" = "$p" ] && exit 1; done; exit 0',
        "apt-get": 'echo "apt-get $*" >> "$FAKE_LOG"',
        "id": 'echo "$FAKE_UID"',
    }
    for name, body in scripts.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    return bin_


def _run(tmp_path: Path, cmd: list[str], uid: int, missing: str
         ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}",
           "FAKE_UID": str(uid), "FAKE_MISSING": missing,
           "FAKE_LOG": str(tmp_path / "apt.log")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=REPO)


def _packages() -> list[str]:
    return subprocess.run([str(DEPS), "list"], capture_output=True, text=True,
                          check=True).stdout.split()


def test_the_package_list_is_in_one_place() -> None:
    pkgs = _packages()
    assert {"qemu-system-x86", "prometheus", "gcc", "dpkg-dev", "python3-venv"} <= set(pkgs)
    for other in (REPO / ".ci" / "run", REPO / "Makefile"):
        text = other.read_text()
        named = [p for p in pkgs if p != "make"
                 and re.search(rf"(?<![\w./-]){re.escape(p)}(?![\w-])", text)]
        assert named == [], f"{other.name} names packages itself: {named}"
    assert ".ci/deps ensure" in (REPO / ".ci" / "run").read_text()
    assert re.search(r"^test: deps ", (REPO / "Makefile").read_text(), re.M)


def test_not_root_and_missing_stops_before_testing(tmp_path: Path) -> None:
    r = _run(tmp_path, ["make", "test"], uid=1000, missing="qemu-system-x86 prometheus")
    assert r.returncode != 0
    assert "    sudo apt-get install -y --no-install-recommends qemu-system-x86 prometheus\n" \
        in r.stderr, r.stderr
    assert "pytest" not in r.stdout + r.stderr                   # nothing was tested
    assert not (tmp_path / "apt.log").exists()


def test_root_installs_what_is_missing(tmp_path: Path) -> None:
    r = _run(tmp_path, [str(DEPS), "ensure"], uid=0, missing="prometheus")
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "apt.log").read_text().splitlines()
    assert log == ["apt-get update -qq",
                   "apt-get install -y -qq --no-install-recommends prometheus"]


def test_nothing_missing_installs_nothing(tmp_path: Path) -> None:
    r = _run(tmp_path, [str(DEPS), "ensure"], uid=1000, missing="")
    assert r.returncode == 0 and r.stderr == ""
    assert not (tmp_path / "apt.log").exists()


def test_a_skipped_test_fails_make_test(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\ndef test_ok():\n    pass\n\n"
        "def test_skipped():\n    pytest.skip('qemu-system-x86_64 is not installed')\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
           "tests.support.no_skips", str(tmp_path / "test_x.py")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert r.returncode == 1, r.stdout
    assert "skipped tests fail make test" in r.stdout
    assert "test_x.py::test_skipped: Skipped: qemu-system-x86_64 is not installed" in r.stdout
    r = subprocess.run([*cmd, "-k", "ok"], capture_output=True, text=True, env=env,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stdout
