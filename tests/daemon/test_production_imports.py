"""A production daemon (``vfiod run --backend linux``, no ``[sim]`` table) never loads the
simulated kernel: its 28 modules held 0.9 MiB of every daemon's memory and put the
simulator's code in a process that drives real devices (docs/benchmarks.md §2, RSS per guest).

The daemon runs with ``PYTHONPROFILEIMPORTTIME`` (``-X importtime``), which prints every
module the process imports, from any thread, on its standard error; the test waits for
READY, stops it and reads the list.
A ``[sim]`` table still loads the simulator (its device names are checked against it)."""

from __future__ import annotations

from pathlib import Path

from tests.support.daemons import LinuxDaemon

SIM_PACKAGE = "vfiod.kernel.sim"


def _imported_by_daemon(tmp_path: Path, config: str) -> list[str]:
    """Start ``vfiod run --backend linux`` with ``config`` (``PYTHONPROFILEIMPORTTIME``: the
    environment's ``-X importtime``), wait for READY, stop it with SIGTERM; the modules it
    imported, in import order."""
    d = LinuxDaemon("production", config, tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        d.wait_ready()
        d.terminate()
    finally:
        d.kill()
    # "import time:   self [us] | cumulative | imported package" lines
    return [line.rsplit("|", 1)[1].strip() for line in d.log().splitlines()
            if line.startswith("import time:") and line.count("|") == 2]


def test_a_production_daemon_never_imports_the_simulated_kernel(tmp_path: Path) -> None:
    modules = _imported_by_daemon(tmp_path, "")
    assert "vfiod.daemon.main" in modules and "numpy" in modules     # the list is whole
    sim = [m for m in modules if m == SIM_PACKAGE or m.startswith(SIM_PACKAGE + ".")]
    assert sim == [], f"a --backend linux daemon imported the simulator: {sim}"


def test_a_sim_table_still_checks_its_devices_against_the_simulator(tmp_path: Path) -> None:
    config = '[[sim.device]]\nname = "0000:3b:00.1"\ncapability = "v2_precopy_log"\n'
    modules = _imported_by_daemon(tmp_path, config)
    assert "vfiod.kernel.sim.migration.specs" in modules
