"""What earlier switchovers on this host cost against what was measured for them before
they happened, for the parts a migration cannot measure before its own switchover
(docs/architecture.md §4 "fixed costs measured on this path").

* the commit's waits (``commit_round_trips``): the header's round trip is measured, but
  the switchover adds what no control round trip shows: the stream's tail still in the
  socket buffers, the destination's PREPARED after its checks, the journaled decision,
  COMMIT and RESUMED through both ends' threads. Kept: how much longer they took than
  predicted (seconds), with the final pass's records; added: a line through them
  (``commit_line``: the destination lands and folds a scattered final pass's records
  after the source sent them, 1.4-2.6 ms over the prediction after 52-72 records of a
  sparse 16 GiB guest, -0.2-0.2 ms after none, pooled in one history with them). On an
  unpaced link the largest share is the stream's tail:
  the socket buffers hold megabytes the destination has not consumed yet when the guest
  pauses. The source's send queue is measured and predicted at the bandwidth; what the
  destination's receive queue holds (at most its receive buffer, up to
  ``net.ipv4.tcp_rmem``'s maximum) is not visible from the source and is learned here;
* the final dirty sync (``final_sync``): predicted from the pre-copy syncs, whose first
  pays one-off costs (first touch of the bitmaps, the first query of each log) and, with a
  single pass, is the only sample. Kept: actual / measured (a ratio: a sync's cost scales
  with the guest, the one-off share is alike);
* the opted-out containers' share (``opted_out_share``): a container whose device opted
  out of pre-copy dirty tracking is not queried before stop-and-copy, so pre-copy counts
  all of its mapped RAM dirty. Its stop-and-copy query says how much its devices really
  wrote since tracking began. Kept: that fraction of its mapping per second of tracking
  (a fraction alone, learnt from a migration forced after minutes, would count most of
  the mapping in one that switches over in a second); the prediction counts the largest
  kept rate times this migration's tracking time, at most the whole mapping, and never
  less than the source's sample of the mapping finds written (``optout_sample``: all
  that decides while nothing is kept);
* the devices' stop and the destination's load (``device_stop``, ``dest_load_resume``):
  the arcs measured at every pass are pending queries, but stopping a device and loading
  its state on the other end cost time per byte of its state. Kept: the extra time over
  the arcs per byte of device state, from migrations with at least 1 MiB of it; below
  that, the extra time itself (seconds: pausing the guest and the arcs' own fixed cost,
  4-9 ms against 1-2 ms of arcs for a 256 KiB state in the real-kernel tier's emulated
  guest), used for states below 1 MiB. With none kept, each is taken to cost at least the
  devices' setup (``transition_s``, the first arc: a real state change, RUNNING ->
  PRE_COPY, where the later arcs are queries), up to a bound for a setup that carried a
  one-off cost;
* the stream's end (in ``ram_transfer``): END_OF_STATE records and the MANIFEST after the
  last RAM, measured at each switchover (2-10 ms in that emulated guest). Kept: the
  time itself; with none kept, the source's rehearsal of it (``switchover_warm_up``);
* the final pass's records (in ``ram_transfer``): what the final RAM pass took beyond its
  bytes over the link, its framing CPU and the stream's end, per record of it. A pass of
  scattered pages sends many small records, and each costs the receiving end's
  bookkeeping and the handover between both ends' threads, which the sender's own CPU
  time does not show (a 0.5 MiB final pass of 16 records: 1 ms over its prediction in
  every run of the sparse guests). Kept: seconds per record, applied to the records the
  next prediction counts;
* the verify (``verify``): the final re-hash is predicted from its pending pages, but the
  digests' last fold and the destination's compare come on top (0.1-0.2 ms). Kept: the
  time beyond the prediction (seconds, added); with none kept, the rehearsal's fold and
  compare.

Every correction is a median of the last ``keep`` completed migrations, within bounds (outside
them a sample is a broken clock, not a lesson); with none yet there is no correction.
Migrations learn from earlier ones of the same guest with the same devices
(``HostHistories``): what a 48 MiB device state checksummed at load adds to a commit says
nothing about a serial port's 96 bytes. Until a guest has a switchover of its own, its
migrations borrow the lessons of the guest that migrated last with the same devices
(protocols, flags and identities, whatever the guest's name): on a fleet host most guests
migrate away once, so a history of the guest's own alone would almost never be used, and
the same device model stops and loads its state alike in every guest. The opted-out
containers' rate is not borrowed: it is the guest's own DMA, not its devices'.
``HOST_HISTORY`` is the process's own (a daemon's migrations learn from the ones before
them); tests pass their own. A daemon keeps its histories across restarts
(``history_snapshot`` encodes them, ``vfiod.daemon.history_store`` writes the file):
``kept``/``keep`` and ``HostHistories.shapes``/``adopt`` are what a snapshot reads and
restores.
"""

from __future__ import annotations

import itertools
import statistics
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence

from vfiod.migration.planning.predictor import FixedCosts
from vfiod.migration.session.switchover_warm_up import SwitchoverRehearsal
from vfiod.migration.stream.header import DeviceInfo

_SYNC_BOUNDS = (0.01, 100.0)
_RECORD_BOUND_S = 0.01           # per final-pass record, beyond it a clock broke
_STATE_MIN_BYTES = 1 << 20
_LINE_MIN_SPREAD = 8             # records: below it a slope is noise
#: the most a cold stop or load is taken from the setup's transition: 5 ms plus 5 ms per
#: MiB of device state (the simulator's 8 MiB state stops in 11-17 ms, a 64 KiB one in
#: 0.4-0.8); a longer setup carried a one-off cost (a first call's compilation, a
#: driver's first allocation) that must not hold the migration in pre-copy
_COLD_BASE_S, _COLD_PER_BYTE_S = 0.005, 0.005 / (1 << 20)
#: no rehearsal: a history without a stream's end or a verify adds nothing for them
NOT_REHEARSED = SwitchoverRehearsal()
#: every recorded switchover's place in this process's order (a clock may tie)
_RECORD_ORDER = itertools.count(1)
#: what a kept lesson can be (anything outside is a broken clock or a damaged snapshot,
#: not a lesson): commit_extra's seconds, and each other series' values; seconds within a
#: minute, a device's stop or load at most 10 s per MiB of state
LESSON_BOUNDS = {"commit_extra": (-60.0, 60.0), "sync_ratio": _SYNC_BOUNDS,
                 "stop_per_byte": (0.0, 1e-5), "load_per_byte": (0.0, 1e-5),
                 "stop_extra": (-60.0, 60.0), "load_extra": (-60.0, 60.0),
                 "stream_end": (0.0, 60.0), "record_extra": (-_RECORD_BOUND_S, _RECORD_BOUND_S),
                 "verify_extra": (-60.0, 60.0), "opted_out_rate": (0.0, 1e6)}
#: the lessons a history keeps (each an attribute ``_<name>``), by the name a snapshot
#: gives them; ``commit_extra`` holds (final-pass records, seconds) pairs, the others numbers
SERIES = tuple(LESSON_BOUNDS)
#: the devices of a guest shape: (protocol, flags, identity items) per device
DeviceKind = tuple[tuple[str, int, tuple[tuple[str, str], ...]], ...]


def device_kind(devices: Iterable[DeviceInfo]) -> DeviceKind:
    """What makes two guests' devices stop and load alike: protocols, flags, identities."""
    return tuple((d.protocol, d.flags, tuple(sorted(d.identity.items()))) for d in devices)


def _median(xs: deque[float], default: float) -> float:
    return statistics.median(xs) if xs else default


def commit_line(samples: Iterable[tuple[int, float]]) -> tuple[float, float]:
    """(seconds, seconds per record) through (records, seconds) samples: Theil-Sen (the
    median slope over the pairs whose records differ, at least 0 and at most
    ``_RECORD_BOUND_S``; the intercept the median left over), robust to the one-off slow
    commit that a mean would spread over every prediction. With fewer than 3 samples, or
    records that differ by less than ``_LINE_MIN_SPREAD``, the median alone (slope 0)."""
    xs = list(samples)
    if not xs:
        return 0.0, 0.0
    records = [r for r, _ in xs]
    if len(xs) < 3 or max(records) - min(records) < _LINE_MIN_SPREAD:
        return statistics.median(y for _, y in xs), 0.0
    slopes = [(y2 - y1) / (r2 - r1) for i, (r1, y1) in enumerate(xs)
              for r2, y2 in xs[i + 1:] if r2 != r1]
    slope = min(_RECORD_BOUND_S, max(0.0, statistics.median(slopes)))
    return statistics.median(y - slope * r for r, y in xs), slope


class SwitchoverHistory:
    def __init__(self, keep: int = 8) -> None:
        self._lock = threading.Lock()
        #: (final-pass records, seconds over the predicted commit)
        self._commit_extra: deque[tuple[int, float]] = deque(maxlen=keep)
        self._sync_ratio: deque[float] = deque(maxlen=keep)
        self._stop_per_byte: deque[float] = deque(maxlen=keep)
        self._load_per_byte: deque[float] = deque(maxlen=keep)
        self._stop_extra: deque[float] = deque(maxlen=keep)      # small states, seconds
        self._load_extra: deque[float] = deque(maxlen=keep)
        self._stream_end: deque[float] = deque(maxlen=keep)
        self._record_extra: deque[float] = deque(maxlen=keep)   # per final-pass record
        self._verify_extra: deque[float] = deque(maxlen=keep)
        self._opted_out_rate: deque[float] = deque(maxlen=keep)
        self.migrations = 0
        #: when its last switchover was recorded, in this process's order of them (which
        #: kin is the latest)
        self.recorded_at = 0
        #: the lessons used while this history has none of its own (``HostHistories``)
        self.kin: SwitchoverHistory | None = None

    def record(self, measured: FixedCosts, predicted: dict[str, float],
               actual: dict[str, float], device_bytes: int, *,
               stream_end_s: float = 0.0, final_records: int = 0) -> None:
        """One completed switchover: the fixed costs its last prediction measured (before
        any correction), its predicted and actual parts
        (``vfiod.migration.planning.breakdown``), its device state bytes, the time
        its stream's end took (END_OF_STATE records and the MANIFEST, after the RAM) and
        the records its final RAM pass sent."""
        with self._lock:
            self.migrations += 1
            self.recorded_at = next(_RECORD_ORDER)
            self.kin = None      # its own lessons now; and no chain of lenders kept alive
            # over the prediction, which already has the socket's queue at the bandwidth
            self._add("commit_extra", actual["commit_round_trips"]
                      - predicted["commit_round_trips"], final_records)
            if measured.final_sync_s > 0 and actual["final_sync"] > 0:
                self._add("sync_ratio", actual["final_sync"] / measured.final_sync_s)
            if device_bytes >= _STATE_MIN_BYTES:
                dev_link_s = predicted["device_stop"] - measured.device_stop_s
                stop = actual["device_stop"] - dev_link_s - measured.device_stop_s
                load = actual["dest_load_resume"] - measured.dest_load_resume_s
                self._add("stop_per_byte", max(0.0, stop) / device_bytes)
                self._add("load_per_byte", max(0.0, load) / device_bytes)
            else:
                self._add("stop_extra", actual["device_stop"] - predicted["device_stop"])
                self._add("load_extra", actual["dest_load_resume"]
                          - measured.dest_load_resume_s)
            if stream_end_s >= 0:
                self._add("stream_end", stream_end_s)
            self._add("verify_extra", actual["verify"] - predicted["verify"])
            if final_records > 0:
                self._add("record_extra", (actual["ram_transfer"] - predicted["ram_transfer"]
                                           - max(0.0, stream_end_s)) / final_records)

    def _add(self, series: str, value: float, records: int | None = None) -> None:
        """Keep ``value`` in ``series`` if it is within ``LESSON_BOUNDS`` (outside them it
        is a broken clock, not a lesson; a snapshot holds nothing else); ``records``: the
        final pass's, for ``commit_extra``. Called with the lock held."""
        lo, hi = LESSON_BOUNDS[series]
        if lo <= value <= hi:
            getattr(self, "_" + series).append(value if records is None else (records, value))

    def record_opted_out(self, reported_pages: int, mapped_pages: int,
                         tracked_s: float) -> None:
        """A stop-and-copy query of opted-out containers: ``reported_pages`` of their
        ``mapped_pages`` were written in the ``tracked_s`` seconds since tracking began."""
        if mapped_pages > 0 and tracked_s > 0:
            with self._lock:
                self._add("opted_out_rate", min(1.0, reported_pages / mapped_pages) / tracked_s)

    def opted_out_share(self, tracked_s: float) -> float | None:
        """The part of an opted-out container's mapping to count dirty after ``tracked_s``
        seconds of tracking: the largest rate earlier stop-and-copy queries found, times
        that; None before the first (``optout_sample`` decides)."""
        with self._lock:
            if not self._opted_out_rate:
                return None
            return min(1.0, max(self._opted_out_rate) * max(0.0, tracked_s))

    def kept(self) -> dict[str, list[object]]:
        """Every kept lesson by its ``SERIES`` name, oldest first (for a snapshot)."""
        with self._lock:
            return {name: [list(x) if isinstance(x, tuple) else x
                           for x in getattr(self, "_" + name)] for name in SERIES}

    def keep(self, lessons: Mapping[str, Sequence[object]], migrations: int) -> None:
        """Take ``lessons`` (``SERIES`` names, oldest first, already checked: numbers, and
        (records, seconds) pairs for ``commit_extra``) as if ``migrations`` switchovers
        had been recorded here, in this process's order now."""
        with self._lock:
            for name, values in lessons.items():
                series: deque[object] = getattr(self, "_" + name)
                series.clear()
                series.extend(tuple(v) if isinstance(v, list) else v for v in values)
            self.migrations = migrations
            self.recorded_at = next(_RECORD_ORDER) if migrations else 0
            self.kin = None

    def _teacher(self) -> SwitchoverHistory:
        """The history whose lessons apply: this one, or its kin's while it has none."""
        kin = self.kin
        return kin if self.migrations == 0 and kin is not None and kin.migrations else self

    def lessons(self) -> dict[str, float]:
        """For the migration's timings: the switchovers its corrections come from
        (``history_switchovers``), and whether they are its kin's (``history_borrowed``)."""
        teacher = self._teacher()
        return {"history_switchovers": float(teacher.migrations),
                "history_borrowed": float(teacher is not self)}

    def correct(self, costs: FixedCosts, *, device_bytes: int, records: int = 0,
                rehearsal: SwitchoverRehearsal = NOT_REHEARSED,
                transition_s: float = 0.0) -> FixedCosts:
        """``costs`` as measured in this migration, corrected by earlier switchovers (its
        kin's while it has none); ``device_bytes``: the devices' state, sent and still to
        send; ``records``: the final RAM pass's records as predicted; ``rehearsal``: this
        process's rehearsed stream end and verify, for a history without either;
        ``transition_s``: the devices' setup (a real state change, where each pass's arcs
        are queries), the least a stop and a load take while neither is learnt."""
        return self._teacher()._corrected(costs, device_bytes, records, rehearsal,
                                          transition_s)

    def _corrected(self, costs: FixedCosts, device_bytes: int, records: int,
                   rehearsal: SwitchoverRehearsal, transition_s: float) -> FixedCosts:
        setup_s = min(transition_s, _COLD_BASE_S + _COLD_PER_BYTE_S * device_bytes)
        cold_stop = max(0.0, setup_s - costs.device_stop_s)
        cold_load = max(0.0, setup_s - costs.dest_load_resume_s)
        with self._lock:
            base, per_record = commit_line(self._commit_extra)
            commit = base + per_record * records
            sync = _median(self._sync_ratio, 1.0)
            if device_bytes >= _STATE_MIN_BYTES:
                stop = (_median(self._stop_per_byte, 0.0) * device_bytes
                        if self._stop_per_byte else cold_stop)
                load = (_median(self._load_per_byte, 0.0) * device_bytes
                        if self._load_per_byte else cold_load)
            else:
                stop = _median(self._stop_extra, cold_stop)
                load = _median(self._load_extra, cold_load)
            end = _median(self._stream_end, rehearsal.stream_end_s)
            per_record = _median(self._record_extra, 0.0)
            verify = _median(self._verify_extra, rehearsal.verify_s)
        return FixedCosts(
            device_stop_s=max(0.0, costs.device_stop_s + stop),
            final_sync_s=costs.final_sync_s * sync,
            record_overhead_s=max(0.0, costs.record_overhead_s + end + per_record * records),
            verify_s=max(0.0, costs.verify_s + verify),
            journal_s=costs.journal_s,
            commit_round_trips_s=max(0.0, costs.commit_round_trips_s + commit),
            dest_load_resume_s=max(0.0, costs.dest_load_resume_s + load))


class HostHistories:
    """One ``SwitchoverHistory`` per guest shape: its name and its devices' protocols,
    flags and identities; at most ``shapes`` of them, the least recently used dropped. A
    shape with no switchover of its own borrows from its kin: the shape with the same
    devices (any guest's name) whose switchover was recorded last."""

    def __init__(self, keep: int = 8, shapes: int = 256) -> None:
        self._keep, self._shapes = keep, shapes
        self._lock = threading.Lock()
        self._by_shape: OrderedDict[tuple[str, DeviceKind], SwitchoverHistory] = OrderedDict()

    @property
    def keep_per_series(self) -> int:
        return self._keep

    def of(self, guest: str, devices: Iterable[DeviceInfo]) -> SwitchoverHistory:
        kind = device_kind(devices)
        shape = (guest, kind)
        with self._lock:
            h = self._by_shape.pop(shape, None) or SwitchoverHistory(self._keep)
            if h.migrations == 0:
                kin = [o for (_, k), o in self._by_shape.items() if k == kind and o.migrations]
                h.kin = max(kin, key=lambda o: o.recorded_at, default=None)
            self._hold(shape, h)
            return h

    def shapes(self) -> list[tuple[str, DeviceKind, SwitchoverHistory]]:
        """(guest, device kind, history) of every shape, the least recently used first."""
        with self._lock:
            return [(guest, kind, h) for (guest, kind), h in self._by_shape.items()]

    def adopt(self, guest: str, kind: DeviceKind, history: SwitchoverHistory) -> None:
        """Hold ``history`` for the shape (``guest``, ``kind``) as its most recently used
        (a restored snapshot's; the shapes bound still holds)."""
        with self._lock:
            self._by_shape.pop((guest, kind), None)
            self._hold((guest, kind), history)

    def _hold(self, shape: tuple[str, DeviceKind], history: SwitchoverHistory) -> None:
        """``history`` as the shape's, its most recently used; the least recently used
        dropped beyond ``shapes``. Called with the lock held."""
        self._by_shape[shape] = history
        while len(self._by_shape) > self._shapes:
            self._by_shape.popitem(last=False)


HOST_HISTORY = HostHistories()
