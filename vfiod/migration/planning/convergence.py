"""Is pre-copy getting anywhere? (docs/architecture.md §4).

Pure code, fed one ``Prediction`` per pass, so that no migration runs forever whatever
the prediction says:

* ``ConvergenceWatch.observe(p)`` returns why pre-copy is not converging, or ``None``:
  - the remaining bytes stopped shrinking: ``stall_iterations`` passes in a row without
    falling below ``1 - min_shrink`` of the remaining bytes at the last progress (an
    opted-out device in a shared container keeps all of its RAM dirty; a dirty rate close
    to the bandwidth keeps the same amount dirty; a fixed cost over the limit leaves
    nothing to shrink);
  - the predictor itself said ``will_converge=False`` (dirty rate at or above the
    bandwidth, no dirty tracking) for ``not_converging_iterations`` passes in a row.

  Either must also have held for ``min_s`` seconds (by the predictions' own timestamps):
  passes with nothing to send are short, and a verdict after a second of them would give
  up on a migration an operator is still watching.
* ``FixedCostSamples``: one fixed cost measured again and again (a device's state arc).
  The first sample, taken at setup, may carry one-off costs (first-call JIT compilation,
  cold caches); once later samples exist it no longer counts, and the estimate is the
  median of the recent later samples.
"""

from __future__ import annotations

import statistics
from collections import deque

from vfiod.migration.planning.predictor import Prediction


def size_text(n: float) -> str:
    """Bytes as whole MiB, or KiB under one MiB (for reasons an operator reads)."""
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 or n == 0 else f"{n / 1024:.0f} KiB"


class ConvergenceWatch:
    def __init__(self, stall_iterations: int, not_converging_iterations: int,
                 min_s: float = 0.0, min_shrink: float = 0.1) -> None:
        if stall_iterations < 1 or not_converging_iterations < 1:
            raise ValueError("convergence windows must be at least one iteration")
        if not 0 <= min_shrink < 1:
            raise ValueError(f"min_shrink {min_shrink} must be in [0, 1)")
        self.stall_iterations = stall_iterations
        self.not_converging_iterations = not_converging_iterations
        self.min_s = min_s
        self.min_shrink = min_shrink
        self._progress_at = 0.0           # timestamp of the last real progress
        self._refused_at = 0.0            # timestamp the will_converge False streak began
        self.best: int | None = None      # lowest remaining bytes seen
        self._mark: int | None = None     # remaining bytes at the last real progress
        self.stalled = 0                  # passes since the last real progress
        self.refused = 0                  # passes in a row with will_converge False

    def observe(self, p: Prediction) -> str | None:
        rem = p.remaining_bytes
        self.best = rem if self.best is None else min(self.best, rem)
        if self._mark is None or rem < self._mark * (1 - self.min_shrink):
            self._mark, self.stalled, self._progress_at = rem, 0, p.at
        else:
            self.stalled += 1
        if p.will_converge:
            self.refused = 0
        else:
            self._refused_at = p.at if self.refused == 0 else self._refused_at
            self.refused += 1
        if (self.refused >= self.not_converging_iterations
                and p.at - self._refused_at >= self.min_s):
            return f"not converging for {self.refused} iterations: {p.reason}"
        if self.stalled >= self.stall_iterations and p.at - self._progress_at >= self.min_s:
            return (f"not converging: remaining bytes stopped shrinking for {self.stalled} "
                    f"iterations (best {size_text(self.best)}, now {size_text(rem)}): {p.reason}")
        return None


class FixedCostSamples:
    def __init__(self, keep: int = 16) -> None:
        self._first: float | None = None
        self._later: deque[float] = deque(maxlen=keep)

    def add(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"negative duration {seconds}")
        if self._first is None:
            self._first = seconds
        else:
            self._later.append(seconds)

    @property
    def first_s(self) -> float:
        """The first sample (0 before any): for the device arcs, the setup's."""
        return self._first or 0.0

    @property
    def estimate_s(self) -> float:
        if self._later:
            return float(statistics.median(self._later))
        return self._first or 0.0
