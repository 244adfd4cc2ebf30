"""numba_first_call_cached: what ``cache=True`` saves a freshly started daemon.

A fresh ``python`` subprocess imports ``vfiod.dirty.bitmap_kernels`` and calls every public
kernel once on a small bitmap (what the first dirty sync of a new daemon does), timing that
from before the import to after the last call (interpreter start-up is not counted).

* cold: ``NUMBA_CACHE_DIR`` is a new empty temporary directory, so everything compiles;
* warm: the same directory again, now filled by the cold run.

ratio = warm / cold (lower is better); target < 0.2. The import of numpy and numba is in
both numbers. Cold runs are expensive (a full compile), so at most 2 are made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bench.timing import row

ROOT = Path(__file__).resolve().parents[2]

_CHILD = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
from vfiod.dirty import bitmap_kernels as K
w = np.arange(1, 9, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
d = np.zeros(10, dtype=np.uint64)
K.or_merge(d, w, 37, 500)
K.or_merge(d, w, 64, 500)
K.popcount(w, 500)
K.dirty_runs(w, 500, 3)
K.test_and_clear(d, 5, 300)
K.set_range(d, 5, 300)
K.rescale(w, 4096, 65536, 500)
K.rescale(w, 65536, 4096, 30)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def _first_call(cache_dir: str) -> float:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=600)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def numba_first_call_cached(reps: int) -> dict[str, Any]:
    cold = warm = float("inf")
    for _ in range(min(reps, 2)):
        with tempfile.TemporaryDirectory(prefix="vfiod-numba-bench-") as d:
            cold = min(cold, _first_call(d))
            for _ in range(reps):
                warm = min(warm, _first_call(d))
    return row("numba_first_call_cached", warm, "s",
               "same subprocess with an empty NUMBA_CACHE_DIR (full compile)", cold, warm / cold,
               target_ratio=0.2, note="ratio = warm / cold, lower is better; import of numpy, "
               f"numba and the kernels + first call of every kernel; best of {reps} warm, "
               f"{min(reps, 2)} cold")


def benchmarks() -> list[tuple[str, Callable[..., Any]]]:
    return [("numba_first_call_cached", numba_first_call_cached)]
