"""Observe-only devices (docs/architecture.md §8.5): devices another VMM owns and
migrates itself. vfiod reads each one's migration state from debugfs
(``vfiod.vfio.debugfs``, docs/kernel-contract.md §12) for ``vfiod ctl status`` and the
metrics, and never opens it, its group or its container.

Reads happen on demand, when a status answer or a scrape asks, and are shared for
``MAX_AGE_S``: a debugfs read is a few small syscalls per device, and a burst of status
requests or scrapes reads each device once. Each row says when it was read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from vfiod.daemon.config_observe import ObserveConfig
from vfiod.kernel.ops import KernelOps
from vfiod.vfio.debugfs import MigrationStateReading, read_migration_state

#: seconds a reading is reused for (status and scrapes within it share one read)
MAX_AGE_S = 1.0


class ObservedDevices:
    def __init__(self, observed: Sequence[ObserveConfig], kernel: KernelOps, *,
                 max_age_s: float = MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.kernel = kernel
        self.max_age_s = max_age_s
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._observed = tuple(observed)
        #: (monotonic, wall) time of the last read, and what it found
        self._read: tuple[float, float] | None = None
        self._readings: tuple[MigrationStateReading, ...] = ()

    def replace(self, observed: Sequence[ObserveConfig]) -> None:
        """A reload's new list (SIGHUP applies it at once); the next answer reads anew."""
        with self._lock:
            self._observed = tuple(observed)
            self._read = None

    def rows(self) -> list[dict[str, Any]]:
        """One plain row per observed device, in configuration order: ``device``,
        ``owner``, ``state`` (a state name, ``unknown``, or None when unreadable),
        ``raw``, ``problem`` and ``reason`` (vfiod.vfio.debugfs), ``read_at`` (Unix time)
        and ``age_s``."""
        with self._lock:
            now = self._clock()
            if self._read is None or now - self._read[0] >= self.max_age_s:
                self._readings = tuple(read_migration_state(self.kernel, o.device)
                                       for o in self._observed)
                self._read = (now, self._wall())
            read_mono, read_wall = self._read
            return [{"device": o.device, "owner": o.owner, "state": r.state, "raw": r.raw,
                     "readable": r.readable, "problem": r.problem, "reason": r.reason,
                     "read_at": read_wall, "age_s": max(0.0, now - read_mono)}
                    for o, r in zip(self._observed, self._readings, strict=True)]
