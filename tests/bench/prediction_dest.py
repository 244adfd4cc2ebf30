"""The prediction benchmark's destination in a process of its own (docs/architecture.md §4;
issue 15 item 2), as two daemons run: the source's session and the destination's then
share neither an interpreter nor its lock, only the machine.

``migrate_to_process`` (the benchmark's side) starts ``python -m tests.bench.prediction_dest
ROOT REGIME SEED``, which builds the regime's destination (``session_rig.dest_side``),
listens on a loopback port and prints it, runs one ``DestinationSession`` and prints its
result as JSON; the source's session runs here, over the same loopback TCP as in one
process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from vfiod.migration.session.common import MigrationResult, SessionConfig
from vfiod.migration.session.history import SwitchoverHistory
from vfiod.migration.session.link import ThrottledLink
from vfiod.migration.session.source import SourceSession
from vfiod.migration.session.switchover import UNJOURNALED
from vfiod.migration.transport import Listener, connect

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120.0


def migrate_to_process(src: Any, root: Path, regime: str, seed: int, cfg: SessionConfig,
                       rate_bps: float | None, history: SwitchoverHistory) -> MigrationResult:
    """Migrate ``src`` (a ``session_rig.Side``) to a destination process built for
    ``regime`` under ``root``; returns the source's result. The destination's own result
    must be "completed" too, or this raises with its reason."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "tests.bench.prediction_dest", str(root),
                              regime, str(seed)], stdout=subprocess.PIPE, text=True,
                             env=env, cwd=ROOT)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        conn = connect("127.0.0.1", port, timeout=TIMEOUT_S)
        link: Any = ThrottledLink(conn, rate_bps) if rate_bps else conn
        try:
            res = SourceSession(src.guest, link, host=src.facts, config=cfg,
                                memory_encryption="none", journal=UNJOURNALED,
                                history=history).run()
        finally:
            conn.close()
        theirs = json.loads(child.stdout.readline() or "{}")
        if child.wait(TIMEOUT_S) != 0 or theirs.get("result") != "completed":
            raise RuntimeError(f"{regime}: the destination process ended with "
                               f"{child.returncode}: {theirs}")
        return res
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def main(argv: list[str]) -> int:
    from tests.bench.prediction_cases import REGIMES, guest_of, session_config
    from tests.support.session_rig import dest_side
    from vfiod.migration.session.dest import DestinationSession

    root, name, seed = Path(argv[0]), argv[1], int(argv[2])
    regime = next(r for r in REGIMES if r.name == name)
    plans, _, ram = guest_of(regime)
    dst = dest_side(root, plans, ram=ram, seed=seed)
    try:
        with Listener("127.0.0.1", 0) as lst:
            print(lst.address[1], flush=True)
            with lst.accept(timeout=TIMEOUT_S) as conn:
                res = DestinationSession(dst.guest, conn, host=dst.facts,
                                         config=session_config(regime),
                                         memory_encryption="none",
                                         journal=UNJOURNALED).run()
        print(json.dumps({"result": res.result, "reason": res.reason}), flush=True)
    finally:
        dst.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
