"""The state directory (``[paths] state``, the journal's; docs/architecture.md §7): the daemon
makes it, private (0700), when it is missing, and refuses to start, naming it, when it
cannot be one."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

from tests.support.daemon_configs import host_config
from tests.support.daemons import DaemonProcess, child_env, vfiod_cmd


def _with_state(state: Path) -> str:
    return host_config("source") + f'\n[paths]\nstate = "{state}"\n'


def test_missing_state_dir_is_made_private(tmp_path: Path) -> None:
    state = tmp_path / "var" / "lib" / "vfiod"
    d = DaemonProcess(_with_state(state), "state")
    try:
        d.wait_ready()
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert d.stop() == 0, d.log()
    finally:
        d.cleanup()


def test_a_file_in_its_place_stops_the_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory\n")
    config = tmp_path / "vfiod.toml"
    config.write_text(_with_state(state))
    run = subprocess.run(vfiod_cmd("run", "--backend", "sim", "--config", str(config),
                                   "--control-socket", str(tmp_path / "c.sock"),
                                   "--metrics-listen", "", "--sim-root", str(tmp_path / "sim")),
                         capture_output=True, text=True, timeout=60, env=child_env())
    assert run.returncode == 1, run.stderr
    assert f"cannot start: state directory {state}: it exists and is not a directory" in run.stderr, run.stderr
    assert state.read_text() == "not a directory\n"
