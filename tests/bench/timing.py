"""Helpers shared by the benchmark modules: timing, result rows, skips.

A result row is one JSON object (see ``run.py``)::

    {"name", "value", "unit", "baseline", "baseline_value", "ratio"}  + optional keys
    ("note", "target_ratio", ...)

The machine is shared and noisy, so both sides of a ratio are timed the same way in the
same run: the best (minimum) of several repetitions, the least disturbed measurement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REQUIRED = {"name": str, "value": float, "unit": str, "baseline": str,
            "baseline_value": float, "ratio": float}


class BenchSkip(Exception):
    """Raised by a benchmark that cannot run here; the message says what would enable it."""


@dataclass(frozen=True)
class BenchConfig:
    """What the harness passes to benchmarks that ask for it (by parameter name)."""

    size_log2: int = 28  # bitmap bits: 2^28 pages of 4 KiB = 1 TiB of guest memory
    reps: int = 5
    quick: bool = False


def best_time(fn: Callable[[], object], reps: int) -> float:
    """Minimum wall time of ``reps`` calls of ``fn`` (seconds)."""
    best = math.inf
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def row(name: str, value: float, unit: str, baseline: str, baseline_value: float,
        ratio: float, **extra: Any) -> dict[str, Any]:
    """One result row with the required keys first (floats rounded for reading)."""
    out: dict[str, Any] = {"name": name, "value": _r(value), "unit": unit, "baseline": baseline,
                           "baseline_value": _r(baseline_value), "ratio": _r(ratio)}
    out.update(extra)
    return out


def _r(x: float) -> float:
    return float(f"{x:.4g}")


def schema_errors(result: object) -> list[str]:
    """What is wrong with one result row (empty if it is well formed)."""
    if not isinstance(result, dict):
        return [f"result is a {type(result).__name__}, not a dict"]
    errs = []
    for key, typ in REQUIRED.items():
        if key not in result:
            errs.append(f"missing key {key!r}")
            continue
        v = result[key]
        if typ is float:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                errs.append(f"{key!r} must be a finite number, got {v!r}")
        elif not isinstance(v, typ) or not v:
            errs.append(f"{key!r} must be a non-empty {typ.__name__}, got {v!r}")
    return errs
