"""``bitmap_kernels.warm_up`` compiles or loads every kernel a dirty sync and a pass run,
so a migration's first sync, timed for the downtime prediction, does not pay for it
(docs/architecture.md §4 fixed costs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: the kernels behind or_merge, popcount, dirty_runs (and its split), test_and_clear and
#: set_range
SYNC_KERNELS = ("_k_or_merge", "_k_popcount", "_k_runs", "_k_split_runs", "_k_extract",
                "_k_fill")

#: those of a type1 report written in place (``report_in_place``)
IN_PLACE_KERNELS = ("_k_unlike", "_k_save", "_k_count_restore")

PROBE = f"""
from vfiod.dirty import bitmap_kernels as k, report_in_place as r
kernels = [getattr(k, n) for n in {SYNC_KERNELS!r}] + [getattr(r, n) for n in {IN_PLACE_KERNELS!r}]
before = [f.__name__ for f in kernels if f.signatures]
k.warm_up()
after = [f.__name__ for f in kernels if not f.signatures]
print(before, after)
"""


def test_warm_up_prepares_every_kernel_a_sync_uses_in_a_fresh_process() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300, check=True)
    # none ready at import, every one ready after the warm-up
    assert out.stdout.strip() == "[] []", out.stdout + out.stderr
