"""``vfiod kernels`` fills numba's cache with every kernel a migration runs, so that a
daemon's first migration after an install or an upgrade compiles none
(``vfiod/cli/kernels_cmd.py``; README "numba's cache"). With an empty cache `vfiod demo`'s
migration took 15-16 s instead of 3, its setup waiting on the compiler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: a migration of a sim guest (both ends, as the session tests run them) in a fresh
#: process, printing the vfiod kernels numba compiled while it ran, as JSON
MIGRATE_AND_LIST_COMPILES = """
import json, tempfile
from pathlib import Path
from vfiod.cli.kernels_cmd import compiled_kernels
from tests.support.session_rig import (MiB, SideContainer, add_workload, assert_migrated,
                                       migrate, pair, spec)
from vfiod.kernel.sim.workload import DmaTarget
from vfiod.vfio import RamRegion
with compiled_kernels() as compiled, tempfile.TemporaryDirectory() as tmp:
    dev = spec("v2_precopy_log")
    src, dst = pair(Path(tmp), [SideContainer([dev])], ram=(RamRegion("ram", 0, 64 * MiB),),
                    fill_bytes=4 * MiB)
    try:
        wl = add_workload(src, [DmaTarget(dev.name, 0, 8 * MiB)], dirty_rate_bps=20e6,
                          hot_fraction=0.5, seed=3)
        wl.start()
        wl.wait_for_writes(1)
        run = migrate(src, dst)
        assert_migrated(src, dst, run)
    finally:
        src.close()
        dst.close()
print(json.dumps(sorted(set(compiled))))
"""


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}


def _kernels(cache: Path) -> dict[str, object]:
    vfiod = Path(sys.executable).parent / "vfiod"
    out = subprocess.run([str(vfiod), "kernels", "--json"], capture_output=True, text=True,
                         env=_env(cache), timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return dict(json.loads(out.stdout))


def _compiled_by_a_migration(cache: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-c", MIGRATE_AND_LIST_COMPILES], cwd=REPO,
                         capture_output=True, text=True, env=_env(cache), timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_a_migration_after_vfiod_kernels_compiles_nothing(tmp_path: Path) -> None:
    # an empty cache (an install): a migration compiles its kernels inside itself
    assert _compiled_by_a_migration(tmp_path / "install") != []
    cache = tmp_path / "warmed"
    first = _kernels(cache)
    assert first["cache"] == str(cache) and first["compiled"]      # it filled the cache
    assert _kernels(cache)["compiled"] == []                        # and loads from it
    assert _compiled_by_a_migration(cache) == []
