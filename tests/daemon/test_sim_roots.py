"""Temporary simulated-host roots: one left by a vfiod killed with SIGKILL is removed when
the next starts; a live owner's, a reused pid's owner and a configured root are judged
right."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vfiod.daemon.simhost import OWNER_FILE, make_sim_root, remove_stale_sim_roots

KILLED = ("import os, signal, sys\n"
          "from vfiod.daemon.simhost import make_sim_root\n"
          "root = make_sim_root(sys.argv[1])\n"
          "open(os.path.join(root, 'state'), 'w').write('x')\n"
          "print(root, flush=True)\n"
          "os.kill(os.getpid(), signal.SIGKILL)\n")


def test_roots_of_dead_owners_are_removed_and_others_kept(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == -9, run.stderr
    dead = Path(run.stdout.strip())
    assert (dead / "state").exists()
    mine = Path(make_sim_root(str(tmp_path)))
    configured = tmp_path / "vfiod-sim-configured"     # a --sim-root: no owner file
    configured.mkdir()
    reused = tmp_path / "vfiod-sim-reused"             # our pid, another start time
    reused.mkdir()
    (reused / OWNER_FILE).write_text(f"{os.getpid()} 1.0\n")
    other = tmp_path / "unrelated"
    other.mkdir()

    assert sorted(remove_stale_sim_roots(str(tmp_path))) == sorted([str(dead), str(reused)])
    assert not dead.exists() and not reused.exists()
    assert mine.exists() and configured.exists() and other.exists()
    assert remove_stale_sim_roots(str(tmp_path)) == []
