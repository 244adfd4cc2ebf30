"""``vfiod run --backend sim --sim-root DIR`` starts again over DIR after a clean stop and
after SIGKILL (issue 10's finding: it refused with ``File exists``): the simulated host's
tree is rebuilt from the configuration, so its devices come back reset, as a crashed
host's are (the kernel resets a device when its last fd closes), while the guest's
file-backed RAM is kept. A DIR holding a tree vfiod did not make is refused and left alone
(docs/architecture.md §1 step 8, the restart)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemons import child_env, vfiod_cmd
from tests.support.fault_rig import FaultHost, RigGuest, host_config, pattern

GUESTS = [RigGuest("g1", 0), RigGuest("g2", 1)]


@pytest.fixture
def host() -> Iterator[FaultHost]:
    h = FaultHost("restart", "source", GUESTS,
                  lambda h: host_config("source", GUESTS, h.root, "127.0.0.1:0"))
    try:
        yield h
    finally:
        h.close()


def _devices(h: FaultHost) -> dict[str, str]:
    return {d["name"]: d["state_label"] for g in h.status()["guests"] for d in g["devices"]}


def test_restart_over_the_root_after_sigterm_and_sigkill(host: FaultHost) -> None:
    host.start()
    running = {"g1": "running", "g2": "running"}
    assert {g: host.guest_state(g) for g in running} == running
    assert host.sigterm() == 0, host.log()
    host.start()                                   # the finding: File exists
    assert {g: host.guest_state(g) for g in running} == running
    assert set(_devices(host).values()) == {"RUNNING"}
    host.sigkill()
    host.start()
    assert {g: host.guest_state(g) for g in running} == running, host.log()
    assert set(_devices(host).values()) == {"RUNNING"}
    assert host.ram_path("g1").read_bytes() == pattern("g1", GUESTS[0].ram_bytes)
    assert host.log().count("simulated host rebuilt over") == 2, host.log()
    # rebuilt from the configuration, not reused: a device dropped from it is gone
    host.config_path.write_text(host_config("source", GUESTS[:1], host.root, "127.0.0.1:0"))
    host.restart()
    assert [d["name"] for d in host.call("devices")["devices"]] == [GUESTS[0].device("source")]


def test_a_tree_vfiod_did_not_make_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "sim"
    (root / "sys").mkdir(parents=True)
    (root / "sys" / "precious").write_text("keep me\n")
    config = tmp_path / "vfiod.toml"
    config.write_text(host_config("source", GUESTS, tmp_path, "127.0.0.1:0"))
    run = subprocess.run(vfiod_cmd("run", "--backend", "sim", "--config", str(config),
                                   "--control-socket", str(tmp_path / "c.sock"),
                                   "--metrics-listen", "", "--sim-root", str(root)),
                         capture_output=True, text=True, timeout=60, env=child_env())
    assert run.returncode == 1, run.stderr
    assert f"--sim-root {root}: its sys/ was not made by vfiod's simulated host" in run.stderr, \
        run.stderr
    assert (root / "sys" / "precious").read_text() == "keep me\n"
