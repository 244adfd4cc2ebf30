"""The source's prediction after each pre-copy pass (docs/architecture.md §4): the
predictor's inputs from the dirty sync and the devices' pending bytes
(``phases.prediction_numbers``), the fixed costs measured in this migration (the devices'
arcs, the final sync, the final pass's re-hash, framing and runs, the journal's records,
two round trips and the destination's landing of pages its memory never held), corrected
by earlier switchovers (``history``), and the policy's verdict, recorded as the pass's
progress. Mixed into ``SourceSession``.
"""

from __future__ import annotations

from vfiod.dirty.tracker import DirtyTracker
from vfiod.dirty.tracker_status import SyncResult
from vfiod.migration.device.protocol import Pending
from vfiod.migration.planning.breakdown import predicted_parts
from vfiod.migration.planning.convergence import ConvergenceWatch, FixedCostSamples
from vfiod.migration.planning.predictor import (
    Decision,
    DowntimePredictor,
    FixedCosts,
    IterationInputs,
)
from vfiod.migration.session.common import SessionBase
from vfiod.migration.session.digest import RamDigests
from vfiod.migration.session.first_touch import first_touch_landing_s
from vfiod.migration.session.history import SwitchoverHistory
from vfiod.migration.session.link import ThrottledLink
from vfiod.migration.session.optout_sample import OptedOutSample, with_opted_out_share
from vfiod.migration.session.phases import RamSender, final_pass_overheads, prediction_numbers
from vfiod.migration.session.status import IterationProgress
from vfiod.migration.session.switchover_warm_up import SwitchoverRehearsal
from vfiod.migration.session.vmm_half import VmmSourceHalf
from vfiod.migration.stream.writer import StreamWriter


class SourcePrediction(SessionBase):
    """``_predict``, and the state it reads: set up by ``SourceSession``."""

    tracker: DirtyTracker | None
    digests: RamDigests | None
    writer: StreamWriter | None
    sender: RamSender | None
    predictor: DowntimePredictor
    history: SwitchoverHistory
    vmm: VmmSourceHalf | None
    _opted_out: OptedOutSample | None
    _rehearsal: SwitchoverRehearsal
    _arcs: FixedCostSamples
    _syncs: FixedCostSamples
    _watch: ConvergenceWatch
    _tracking_t0: float
    _rtt: float
    _first_touch_s: float         # the destination's, per page its memory never held
    _measured_costs: FixedCosts
    _predicted_parts: dict[str, float]
    _uncorrected_parts: dict[str, float]

    def _predict(self, sync: SyncResult, pendings: list[Pending], start: float, ram: int,
                 dev_bytes: int) -> Decision:
        assert self.tracker is not None and self.digests is not None and self.writer
        assert self.sender is not None
        cfg = self.config
        now = self.clock()
        num = with_opted_out_share(prediction_numbers(
            self.tracker, sync, pendings, cfg.max_run_pages,
            cfg.record_bytes // self.guest.page_size, self.digests), self._opted_out,
            self.history.opted_out_share(now - self._tracking_t0))
        self.predictor.dirty.record_sync(now, num.measured_dirty_bytes)
        bw = self.predictor.bandwidth.bps
        verify_s, records_s = final_pass_overheads(
            num, self.digests, self.sender, bw, self._rehearsal.run_s,
            paced=isinstance(self.link, ThrottledLink))
        landing_s = first_touch_landing_s(num, self._first_touch_s, bw, cfg.record_bytes,
                                          self.guest.page_size)
        arc, journal_s = self._arcs.estimate_s, self.journal.switchover_write_s()
        t = self.result.timings
        t["predicted_verify_s"], t["predicted_record_overhead_s"] = verify_s, records_s
        t["predicted_journal_s"], t["predicted_first_touch_s"] = journal_s, landing_s
        t["first_touch_pages"] = num.first_touch_pages
        # all measured here: stopping, the devices' arcs, a dirty sync, the final re-hash,
        # per-record costs, the journal's records, two round trips, the destination's arcs
        self._syncs.add(sync.duration_s)
        self._measured_costs = FixedCosts(
            device_stop_s=arc, final_sync_s=self._syncs.estimate_s, record_overhead_s=records_s,
            verify_s=verify_s, journal_s=journal_s,
            commit_round_trips_s=2 * self._rtt + landing_s,
            dest_load_resume_s=arc)
        dev = num.device_stopcopy_bytes + num.device_precopy_bytes
        costs = self.predictor.costs = self.history.correct(
            self._measured_costs, device_bytes=self.writer.device_bytes_sent + dev,
            records=num.dirty_records, rehearsal=self._rehearsal, transition_s=self._arcs.first_s)
        t.update(self.history.lessons())        # this guest's, or its devices' kin's
        queued = t["predicted_queued_bytes"] = self.link.unsent_bytes()
        p = self.predictor.predict(IterationInputs(
            now, num.dirty_ram_bytes, num.device_stopcopy_bytes, num.device_precopy_bytes,
            num.tracking, num.assumed_dirty_bytes, queued, self.link.ready_bytes()))
        self._predicted_parts = predicted_parts(p, costs)
        self._uncorrected_parts = predicted_parts(p, self._measured_costs)
        decision, why = self.config.policy.verdict(
            p, iteration=self.iteration, elapsed_s=now - start,
            # with a VMM half the VMM's convergence decides; only a timeout cancels here
            not_converging=self._watch.observe(p) if self.vmm is None else None)
        prog = IterationProgress(
            iteration=self.iteration, elapsed_s=now - (self.started_at or start),
            ram_sent_bytes=ram, device_sent_bytes=dev_bytes,
            total_sent_bytes=self.writer.bytes_sent, remaining_bytes=p.remaining_bytes,
            dirty_ram_bytes=p.ram_bytes, device_bytes=p.device_bytes,
            dirty_rate_bps=p.dirty_rate_bps, bandwidth_bps=p.bandwidth_bps,
            bandwidth_source=p.bandwidth_source, predicted_downtime_s=p.downtime_s,
            will_converge=p.will_converge, decision=decision.value, reason=why,
            sync_s=sync.duration_s, assumed_dirty_bytes=num.assumed_dirty_bytes)
        self._record_pass(prog)
        return decision
