"""The pieces the source's phases are made of (docs/architecture.md §1 step 5, §4, §5): sending dirty
RAM in measured slices, and the numbers each prediction is made from (dirty pages as the
providers report them, docs/kernel-contract.md §3.9, §4.4, §7; device bytes from §6.8-§6.9 / §5.5).

``RamSender.send`` takes the dirty runs of a pass (``DirtyTracker.take_dirty_runs``) and
hands them to the ``StreamWriter`` in slices of ``slice_bytes``. After each slice it
records (stream bytes, send time) in the ``BandwidthEstimator`` — time spent sending only,
so dirty syncs and device reads between passes do not lower the estimate — and the CPU
time the slice cost in a ``CostModel`` (per byte and per record: a final pass of scattered
pages is bound by framing, not by the link), marks live pages for re-hashing
(``digest``; a quiescent slice's CRCs go from the writer to the digests instead,
docs/protocol.md §7.3), and calls ``between()`` (the session checks for cancel there). It counts
the pages of the pass still to send (``pass_left_pages``, a status read at any time shows
them) and calls ``publish()`` as a pre-copy pass starts (its number and size) and then at most every
``publish_every_s``, so the daemon's figures move during a pass at a bounded rate (once per
slice at most, no per-page work). In the first
pass, with ``zero_scan``, each run is read first with ``pread`` and only pages holding
data are sent: a guest's RAM is mostly never-written holes of a sparse file, which read
as zeros without being allocated, and the destination's fresh RAM is zero already.

``prediction_numbers`` turns a ``SyncResult`` and the devices' ``Pending`` into the
predictor's inputs: the dirty rate excludes containers that were not queried (skipped by
the pre-copy opt-out, or whose log was lost) because their "all dirty" is a placeholder,
not a measurement; they still count in the RAM still to send (``dirty_bytes`` includes
the opted-out containers' ``assumed_dirty_bytes``, their whole mappings, of which
``optout_sample.with_opted_out_share`` keeps the part sampled or learnt written).
``final_pass_overheads``
adds what the final pass costs beyond its bytes: the re-hash of the live pages still
pending, and the CPU time of framing its records and of its runs (the rehearsed extra per
run, ``switchover_warm_up``: a scattered pass's pages cost more than the bulk the
bandwidth was measured on); ``first_touch_pages`` the dirty pages never sent
(``first_touch``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from vfiod.dirty.tracker import DirtyTracker
from vfiod.dirty.tracker_status import SyncResult
from vfiod.migration.device.protocol import Pending
from vfiod.migration.guest import Guest
from vfiod.migration.planning.predictor import BandwidthEstimator
from vfiod.migration.session.costs import RECORD_PRIOR_S, CostModel, records_for
from vfiod.migration.session.digest import RamDigests
from vfiod.migration.session.ram_files import PieceBuffer, nonzero_page_runs
from vfiod.migration.stream.writer import StreamWriter

#: what one piece of a pass is assumed to cost the stream before the passes measured it
#: as one run of a RAM_RUNS record (docs/protocol.md §5.4); in a RAM record of its own it
#: is ``costs.RECORD_PRIOR_S``
PIECE_PRIOR_S = 10e-6


class RamSender:
    def __init__(self, writer: StreamWriter, guest: Guest, digests: RamDigests,
                 bandwidth: BandwidthEstimator, *, slice_bytes: int, record_pages: int,
                 clock: Callable[[], float], between: Callable[[], None],
                 publish: Callable[[], None] | None = None,
                 publish_every_s: float = 0.1,
                 ready: Callable[[], int] = lambda: 0) -> None:
        """``ready``: the bytes the link passes now without pacing (``Link.ready_bytes``)."""
        self.writer = writer
        self.ready = ready
        self.record_pages = record_pages
        # before the passes separate the two, a piece is assumed to cost what one costs
        # in its own RAM record, or in a RAM_RUNS record with others (README "Scattered
        # passes": 13-16 against 6.5-10 us of the source's CPU a piece)
        self.cost = CostModel(PIECE_PRIOR_S if writer.header.ram_runs else RECORD_PRIOR_S)
        self.guest = guest
        self.digests = digests
        writer.attach_crc_sink(digests)     # stop-and-copy records' CRCs are the digests
        self.bandwidth = bandwidth
        self.slice_pages = max(1, slice_bytes // guest.page_size)
        self.clock = clock
        self.between = between
        self.publish = publish
        self.publish_every_s = publish_every_s
        self._published: float | None = None
        self.scan_seconds = 0.0
        self.skipped_zero_pages = 0
        #: pages of the current pass not sent (nor skipped as holes) yet
        self.pass_left_pages = 0
        self.pass_records = 0         # records of the current (or last) pass

    def _scan(self, first: int, count: int, buf: PieceBuffer) -> Iterator[tuple[int, int]]:
        """Runs of non-zero pages inside [first, first+count), region by region, read
        through ``buf``."""
        ps = self.guest.page_size
        page, left = first, count
        while left > 0:
            block = self.guest.block_at(page * ps)
            n = min(left, (block.gpa + block.size) // ps - page)
            t0 = self.clock()
            runs = nonzero_page_runs(self.guest.kernel, block.fd,
                                     block.offset + page * ps - block.gpa,
                                     page, n, ps, buf)
            self.scan_seconds += self.clock() - t0
            holes = n - sum(c for _, c in runs)
            self.skipped_zero_pages += holes
            self.pass_left_pages -= holes
            yield from runs
            page += n
            left -= n

    def _runs(self, first: np.ndarray, count: np.ndarray,
              scan: PieceBuffer | None) -> Iterator[tuple[int, int]]:
        for f, n in zip(first.tolist(), count.tolist(), strict=True):
            if scan is not None:
                yield from self._scan(f, n, scan)
            else:
                yield f, n

    def send(self, runs: tuple[np.ndarray, np.ndarray], *, quiescent: bool,
             zero_scan: bool = False) -> int:
        """Send the pages of ``runs``; returns RAM payload bytes sent. A ``zero_scan``
        pass reads through one ``PieceBuffer``, unmapped when the pass ends."""
        with PieceBuffer(self.guest.kernel) if zero_scan else nullcontext() as scan:
            return self._send(runs, quiescent, scan)

    def _send(self, runs: tuple[np.ndarray, np.ndarray], quiescent: bool,
              scan: PieceBuffer | None) -> int:
        self.pass_left_pages = int(runs[1].sum())
        self.pass_records = 0
        # a pre-copy pass's number and size from its start: until its first slice ends
        # the figures would say the previous pass, and a 2-slice pass showed a second
        # figure of its own only between its last slice and its end (not in the
        # downtime: the daemon's figures take a lock a status read may hold)
        if not quiescent:
            self._publish(self.clock(), always=True)
        sent = 0
        batch: list[tuple[int, int]] = []
        pages = 0
        for f, n in self._runs(runs[0], runs[1], scan):
            while n > 0:
                take = min(n, self.slice_pages - pages)
                batch.append((f, take))
                pages += take
                f += take
                n -= take
                if pages >= self.slice_pages:
                    sent += self._slice(batch, quiescent, last=self.pass_left_pages <= pages)
                    batch, pages = [], 0
        if batch:
            sent += self._slice(batch, quiescent, last=True)
        self.pass_left_pages = 0
        return sent

    @property
    def pass_left_bytes(self) -> int:
        return max(0, self.pass_left_pages) * self.guest.page_size

    @property
    def throughput_bps(self) -> float | None:
        """The link's measured rate; None until a window was measured (a prior is not a
        measurement)."""
        return self.bandwidth.bps if self.bandwidth.windows else None

    def _slice(self, batch: Sequence[tuple[int, int]], quiescent: bool,
               last: bool = False) -> int:
        arr = np.asarray(batch, dtype=np.int64)
        records = records_for(arr[:, 1], self.record_pages)
        before, free = self.writer.bytes_sent, self.ready()
        t0, c0 = self.clock(), time.thread_time()
        n = self.writer.send_ram(batch, quiescent=quiescent, last=last)
        t1, c1 = self.clock(), time.thread_time()
        sent = self.writer.bytes_sent - before
        # wall time: what the link delivered, at its paced rate (a paced link's bucket
        # passed ``free`` bytes at once: the prediction credits those separately); CPU
        # time: what framing and checksumming cost here, per byte and per record (a
        # scattered final pass is CPU bound)
        self.bandwidth.record(t0, t1, max(0, sent - free))
        self.cost.add(sent, records, c1 - c0)
        self.pass_records += records
        if not quiescent:       # the guest may write them again: read them after the pass
            self.digests.touch(arr[:, 0], arr[:, 1])
        self.pass_left_pages -= int(arr[:, 1].sum())
        self.between()
        self._publish(t1)
        return n

    def _publish(self, now: float, always: bool = False) -> None:
        if self.publish is not None and (always or self._published is None
                                         or now - self._published >= self.publish_every_s):
            self._published = now
            self.publish()


@dataclass(frozen=True)
class PredictionNumbers:
    dirty_ram_bytes: int            # dirty in the global bitmap now (what is left to send)
    dirty_runs: int                 # runs of dirty pages (each at least one record)
    dirty_records: int
    measured_dirty_bytes: int       # dirtied since the last sync, where really measured
    device_stopcopy_bytes: int
    device_precopy_bytes: int
    tracking: bool                  # some container reports only what was written
    #: counted dirty (opted-out containers, not queried before stop-and-copy)
    assumed_dirty_bytes: int = 0
    #: dirty pages never sent before: the destination may not hold them yet
    first_touch_pages: int = 0


def prediction_numbers(tracker: DirtyTracker, sync: SyncResult, pendings: Sequence[Pending],
                       max_run: int, record_pages: int,
                       digests: RamDigests | None = None) -> PredictionNumbers:
    containers = tracker.status().containers
    unmeasured = 0
    precise = False
    for c in containers:
        if c.name in sync.lost:           # counted whole in new_dirty: not a measurement
            unmeasured += c.mapped_bytes
        elif c.name not in sync.skipped and c.precise:
            precise = True
    # skipped (opted-out) containers are not in new_dirty_bytes but in dirty_bytes, as
    # assumed_dirty_bytes: the prediction counts them, the dirty rate does not
    measured = max(0, sync.new_dirty_bytes - unmeasured)
    firsts, counts = tracker.bitmap.runs(max_run)
    return PredictionNumbers(
        dirty_ram_bytes=sync.dirty_bytes,
        dirty_runs=int(counts.size),
        dirty_records=records_for(counts, record_pages),
        measured_dirty_bytes=measured,
        device_stopcopy_bytes=sum(p.stopcopy_bytes for p in pendings),
        device_precopy_bytes=sum(p.precopy_bytes for p in pendings),
        # containers skipped by the opt-out are tracked: stop-and-copy queries them
        tracking=precise or all(c.name in sync.skipped for c in containers),
        assumed_dirty_bytes=sync.assumed_dirty_bytes,
        first_touch_pages=digests.never_landed(firsts, counts) if digests is not None else 0)


def final_pass_overheads(num: PredictionNumbers, digests: RamDigests, sender: RamSender,
                         bandwidth_bps: float, run_s: float = 0.0, *,
                         paced: bool = True) -> tuple[float, float]:
    """(verify_s, records_s) of the final pass, beyond its bytes over the link: the final
    re-hash (what the source sent live and has not read again: the final pass's own pages
    take their records' CRCs, and the destination reads nothing again), and the CPU
    time framing its records past what the link takes (the pass is bound by the link or
    by that CPU, whichever is slower; the predictor counts bytes / bandwidth), and
    ``run_s`` per run: on a ``paced`` link with that CPU (the wire is the bound, the CPU
    works while it waits), else on top (an unpaced link's bandwidth was measured on the
    first pass's bulk, bound by the ends' CPU, so a run's extra adds to it)."""
    per_byte, per_run = digests.cost.fit()
    verify_s = (digests.pending_pages * digests.page_size * per_byte
                + digests.pending_runs() * per_run)
    cpu_byte, cpu_rec = sender.cost.fit()
    cpu_s = num.dirty_ram_bytes * cpu_byte + num.dirty_records * cpu_rec
    runs_s = num.dirty_runs * run_s
    link_s = num.dirty_ram_bytes / max(1.0, bandwidth_bps)
    if paced:
        return float(verify_s), float(max(0.0, cpu_s + runs_s - link_s))
    return float(verify_s), float(max(0.0, cpu_s - link_s) + runs_s)
