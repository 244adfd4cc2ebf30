"""What earlier switchovers on this host cost against what was predicted for them, for
the parts a migration cannot measure before its own switchover (docs/architecture.md §4
"fixed costs measured on this path").

Three parts of the downtime have no sample before the guest pauses:

* the commit's waits (``commit_round_trips``): the header's round trip is measured, but
  the switchover adds what no control round trip shows: the stream's tail still in the
  socket buffers, the destination's PREPARED after its checks, the journaled decision,
  COMMIT and RESUMED through both ends' threads. The history keeps how much longer than
  predicted they took (seconds, added);
* the final dirty sync (``final_sync``): predicted from the pre-copy syncs, whose first
  pays one-off costs (first touch of the bitmaps, the first query of each log) and, with a
  single pass, is the only sample. The history keeps actual / predicted (a ratio: a sync's
  cost scales with the guest, so a 16 GiB guest's sync says little about a 64 MiB
  guest's in seconds, but the one-off share is alike);
* the destination's final load and resume (``dest_load_resume``): predicted from the
  source's device arcs, but a device's final load on the destination can cost more (a
  large state parsed at once). The history keeps how much longer it took (added).

Each correction is the median of the last ``keep`` completed migrations; with none yet it
is no correction. ``HOST_HISTORY`` is the process's own (a daemon's migrations learn from
the ones before them); tests pass their own.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque

from vfiod.migration.planning.predictor import FixedCosts

#: a ratio outside this range is a broken sample (a clock jump), not a lesson
_RATIO_BOUNDS = (0.01, 100.0)


class SwitchoverHistory:
    def __init__(self, keep: int = 8) -> None:
        self._lock = threading.Lock()
        self._commit_extra: deque[float] = deque(maxlen=keep)
        self._sync_ratio: deque[float] = deque(maxlen=keep)
        self._dest_extra: deque[float] = deque(maxlen=keep)

    def record(self, measured: FixedCosts, actual: dict[str, float]) -> None:
        """One completed switchover: the fixed costs its last prediction measured (before
        any correction) and its actual parts (``vfiod.migration.planning.breakdown``)."""
        with self._lock:
            self._commit_extra.append(actual["commit_round_trips"]
                                      - measured.commit_round_trips_s)
            self._dest_extra.append(actual["dest_load_resume"] - measured.dest_load_resume_s)
            if measured.final_sync_s > 0 and actual["final_sync"] > 0:
                ratio = actual["final_sync"] / measured.final_sync_s
                if _RATIO_BOUNDS[0] <= ratio <= _RATIO_BOUNDS[1]:
                    self._sync_ratio.append(ratio)

    @property
    def migrations(self) -> int:
        with self._lock:
            return len(self._commit_extra)

    def correct(self, costs: FixedCosts) -> FixedCosts:
        """``costs`` as measured in this migration, corrected by earlier switchovers."""
        with self._lock:
            extra = statistics.median(self._commit_extra) if self._commit_extra else 0.0
            ratio = statistics.median(self._sync_ratio) if self._sync_ratio else 1.0
            dest = statistics.median(self._dest_extra) if self._dest_extra else 0.0
        return FixedCosts(
            device_stop_s=costs.device_stop_s, final_sync_s=costs.final_sync_s * ratio,
            record_overhead_s=costs.record_overhead_s, verify_s=costs.verify_s,
            commit_round_trips_s=max(0.0, costs.commit_round_trips_s + extra),
            dest_load_resume_s=max(0.0, costs.dest_load_resume_s + dest))


HOST_HISTORY = SwitchoverHistory()
