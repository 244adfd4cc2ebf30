"""The source side of a live migration (docs/architecture.md §1 steps 5-6, §4; docs/kernel-contract.md §5.4-§5.5,
§6.10 source flow; the seed's hook sequence).

    SETUP    wait for the destination's facts (ACK hello); send the stream HEADER; refuse
             with every preflight reason (ABORT carries them); wait for ACK header (the
             destination checked layout and devices; the wait is the ack round trip);
             start dirty tracking (all RAM dirty); ``save_setup`` each device (v2 PRE_COPY
             or v1 _SAVING|_RUNNING); send each device's ``save_state`` identity record as
             its first data chunk.
    ACTIVE   pass k: take the dirty runs (pass 1: all RAM, holes skipped), send them
             while the guest runs; ``save_live_iterate`` each device; ITERATION mark;
             wait until the destination consumed the pass (``pass_drain.py``); re-hash
             the pages just sent; dirty sync; ``save_live_pending``;
             predict the downtime; the policy says continue, switchover, force or cancel.
    DEVICE   stop: the guest pauses (its run-state handlers stop vCPUs and workload); if
             every device offers P2P, ``quiesce_p2p`` all of them first; then
             ``save_live_complete_precopy`` each (STOP_COPY, read to the end); final dirty
             sync (opted-out containers are queried now); remaining RAM; END_OF_STATE per
             device; MANIFEST; re-hash; send the content digests (control frame DIGESTS).
    commit   wait for ACK prepared (the destination loaded and verified everything and
             waits, stopped); journal the decision to commit; send COMMIT; wait for ACK
             resumed. Actual downtime = pause -> that ACK; REPORT it, the prediction and
             the error to the destination (``source_end.py``).
    done     ``cleanup`` each device (v2: STOP_COPY -> STOP), stop tracking, guest
             POSTMIGRATE, close device/group/container fds.

The destination's HELLO carries a fresh random challenge; the HEADER and the COMMIT answer
it, so a recorded stream cannot be replayed on another connection (docs/protocol.md §8.4).

Any failure or cancel before the commit record rolls back (docs/architecture.md §1.6):
ABORT to the destination (after the MANIFEST: a CANCEL frame; it discards), every device
``rollback`` to RUNNING (v2 ladder: target, recovery state, reset; v1 _RUNNING with _SAVING
cleared), tracking stopped, the guest resumed. Guest memory is only ever read here.

After the commit record the source never resumes on its own (docs/architecture.md §1.7):
if ACK resumed does not come, the result is ``unsettled``, the guest stays paused with its
devices' state kept, and ``settle`` ends it once the destination's answer is known.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vfiod.dirty.tracker import DirtyTracker
from vfiod.dirty.tracker_status import TrackerStatus
from vfiod.errors import PreflightError, ProtocolError
from vfiod.migration.device.protocol import DeviceDataSink
from vfiod.migration.guest import Guest, GuestDevice
from vfiod.migration.planning.convergence import ConvergenceWatch, FixedCostSamples
from vfiod.migration.planning.hostfacts import HostFacts
from vfiod.migration.planning.linkprior import LinkPriorSource
from vfiod.migration.planning.predictor import (
    BandwidthEstimator,
    Decision,
    DowntimePredictor,
    FixedCosts,
)
from vfiod.migration.planning.preflight import MigrationFacts, compare
from vfiod.migration.session.channels import SourceChannels
from vfiod.migration.session.common import (
    UNJOURNALED,
    Cancelled,
    MigrationResult,
    SessionBase,
    SessionConfig,
    SwitchoverJournal,
)
from vfiod.migration.session.digest import RamDigests
from vfiod.migration.session.first_touch import first_touch_from_hello
from vfiod.migration.session.history import HOST_HISTORY, SwitchoverHistory
from vfiod.migration.session.link import Link
from vfiod.migration.session.optout_sample import OptedOutSample
from vfiod.migration.session.pass_drain import SourcePassDrain
from vfiod.migration.session.phases import RamSender
from vfiod.migration.session.source_end import SourceEnding
from vfiod.migration.session.source_predict import SourcePrediction
from vfiod.migration.session.status import IterationProgress, LiveProgress, live_progress
from vfiod.migration.session.switchover_warm_up import warm_source
from vfiod.migration.session.vmm_half import VmmSourceHalf
from vfiod.migration.session.vmm_source import VMM_PASS_S
from vfiod.migration.states import GuestState, MigrationState
from vfiod.migration.stream.header import StreamHeader
from vfiod.migration.stream.writer import StreamWriter
from vfiod.migration.transport.control import (
    AckStage,
    ControlMessage,
    TransportCode,
    TransportError,
)


class SourceSession(SourceChannels, SourceEnding, SourcePassDrain, SourcePrediction,
                    SessionBase):
    role = "source"

    def __init__(self, guest: Guest, link: Link, *, host: HostFacts,
                 config: SessionConfig | None = None, memory_encryption: str = "none",
                 clock: Callable[[], float] = time.monotonic,
                 migration_id: str | None = None, link_prior: LinkPriorSource = None,
                 progress: Callable[[IterationProgress], None] | None = None,
                 live: Callable[[LiveProgress], None] | None = None,
                 source_host: str | None = None,
                 journal: SwitchoverJournal = UNJOURNALED,
                 history: SwitchoverHistory | None = None,
                 vmm: VmmSourceHalf | None = None) -> None:
        """``host``: this host's facts (preflight); ``link_prior``: the egress link's speed
        before the first bandwidth window, or a function answering the latest (a lookup
        still running); ``progress``, ``live``: ``SessionBase``'s; ``journal``: where the
        decision to commit is written first (§1.7); ``history``: earlier switchovers of
        this guest on this host, for what cannot be measured before this one (default:
        this process's, ``HOST_HISTORY``); ``vmm``: the VMM's half of a coordinated
        migration (docs/architecture.md §8.3, ``vmm_source.py``)."""
        super().__init__(guest, link, host=host, config=config,
                         memory_encryption=memory_encryption, clock=clock,
                         migration_id=migration_id, journal=journal)
        self.progress, self.live = progress, live
        self.vmm, self._vmm_incoming, self._vmm_stopped = vmm, "", None
        self._vmm_last_migrating_t: float | None = None
        self.source_host = source_host or self.facts.host.hostname
        self.predictor = DowntimePredictor(BandwidthEstimator(link_prior))
        self.tracker: DirtyTracker | None = None
        self.writer: StreamWriter | None = None
        self.digests: RamDigests | None = None
        self._opted_out: OptedOutSample | None = None    # what their devices wrote, sampled
        self.sender: RamSender | None = None
        self._stop_t: float | None = None
        self._predicted_parts: dict[str, float] = {}   # the last prediction's, by part
        self.history = (history if history is not None
                        else HOST_HISTORY.of(guest.name, guest.device_infos()))
        self._measured_costs = FixedCosts()   # the last prediction's, before the history
        self._uncorrected_parts: dict[str, float] = {}
        self._rtt = self._tracking_t0 = self._first_touch_s = 0.0
        self._arcs = FixedCostSamples()    # the devices' arcs: at setup, then each pass's queries
        #: the pre-copy syncs' durations (the first can pay first-touch costs)
        self._syncs = FixedCostSamples()
        pol = self.config.policy
        self._watch = ConvergenceWatch(pol.stall_iterations, pol.not_converging_iterations,
                                       pol.not_converging_min_s)

    # -- status hooks -----------------------------------------------------------------
    def _tracker_status(self) -> TrackerStatus | None:
        return self.tracker.status() if self.tracker is not None else None

    def _bytes(self) -> tuple[int, int]:
        return (self.writer.bytes_sent if self.writer else self.result.stream_bytes), 0

    def _live(self) -> LiveProgress | None:
        sender, w = self.sender, self.writer       # run() drops them at its end
        return None if sender is None or w is None else live_progress(
            self.iteration, w.bytes_sent, sender.pass_left_bytes, sender.throughput_bps,
            self._last_progress())

    # -- the whole migration ----------------------------------------------------------
    def run(self) -> MigrationResult:
        """Migrate; returns the result (completed, failed or cancelled, never raises for
        a migration failure). The caller closes the link afterwards."""
        try:
            return self._run()
        finally:
            # drop what holds views of guest memory (the stream's staging, the digests)
            self.sender = self.digests = self.writer = self._opted_out = None

    def _run(self) -> MigrationResult:
        self.started_at = self.clock()
        try:
            self._set_state(MigrationState.SETUP)
            self._handshake()
            self._setup()
            self._set_state(MigrationState.ACTIVE)
            self._precopy()
            self._set_state(MigrationState.DEVICE)
            self._stop_and_copy()
            self._await_prepared()
            self._commit_switchover()
        except Cancelled as e:
            return self._rollback(MigrationState.CANCELLED, e)
        except TransportError as e:
            state = (MigrationState.CANCELLED if e.code is TransportCode.PEER_CANCELLED
                     else MigrationState.FAILED)
            return self._rollback(state, e)
        except BaseException as e:
            res = self._rollback(MigrationState.FAILED, e)
            if not isinstance(e, Exception):
                raise
            return res
        return self._after_commit()

    # -- SETUP ------------------------------------------------------------------------
    def _handshake(self) -> None:
        cfg = self.config
        hello = self.link.wait_ack(AckStage.HELLO, cfg.ack_timeout_s)
        try:
            dest = MigrationFacts.from_json(str(hello.fields.get("facts", "")))
        except ValueError as e:
            raise ProtocolError(f"destination hello: {e}") from None
        self.result.peer["host"] = dest.host.hostname
        self.challenge = str(hello.fields.get("challenge", ""))
        if not self.challenge:
            raise ProtocolError("the destination's hello carries no challenge")
        self._first_touch_s = first_touch_from_hello(hello.fields)
        g = self.guest
        channels = self._channels_wanted(hello.fields)
        header = StreamHeader(self.source_host, self.migration_id, g.name, g.page_size,
                              g.ram_regions(), g.device_infos(), challenge=self.challenge,
                              channels=channels, pass_acks=self._offer_pass_acks(hello.fields),
                              ram_runs=hello.fields.get("ram_runs") is True)   # §5.4
        self.writer = StreamWriter(self.link, header, g.guest_ram(),
                                   record_bytes=cfg.record_bytes, batch_bytes=cfg.batch_bytes)
        reasons = compare(self.facts, dest) + self._vmm_disagreement(hello.fields)
        t0, c0 = self.clock(), time.thread_time()     # the round trip (``_header_acked``)
        try:
            self.writer.start()       # the HEADER: the destination checks it too
        except TransportError:
            if not reasons:
                raise                 # refused by the destination alone: its words
        if reasons:                   # ours list every reason, the ABORT carries them
            raise PreflightError(reasons)
        self._header_acked(t0, time.thread_time() - c0)
        self._open_channels(channels)

    def _setup(self) -> None:
        g, cfg, w = self.guest, self.config, self.writer
        assert w is not None
        self._rehearsal = warm_source()     # before the first (timed) sync and the pause
        self.result.timings.update(self._rehearsal.figures())
        self.tracker = g.make_tracker()
        # with a VMM half the VMM sends all of RAM: vfiod sends what devices write after this
        self.tracker.start(initial_all_dirty=self.vmm is None)
        self._tracking_t0 = self.clock()
        views = [b.view() for b in g.ram]
        self._opted_out = OptedOutSample(self.tracker.opted_out_runs(), g.ram_regions(),
                                         views, g.page_size)
        self.predictor.dirty.start(self._tracking_t0)
        t0 = self.clock()
        for d in g.devices:
            self._hook(d, d.driver.save_setup)
        # one arc each way costs about the same: the stop-and-copy arc is predicted from
        # the arcs measured here and at every pass (docs/architecture.md §4 fixed costs)
        self._arcs.add(self.clock() - t0)
        for d in g.devices:
            w.send_device_data(d.name, self._hook(d, d.driver.save_state))
        self.digests = RamDigests(g.ram_regions(), views, g.page_size)
        self.sender = RamSender(w, g, self.digests, self.predictor.bandwidth,
                                slice_bytes=cfg.slice_bytes,
                                record_pages=cfg.record_bytes // g.page_size,
                                clock=self.clock, between=self._check_cancel,
                                publish=self._publish_live, ready=self.link.ready_bytes)
        self._vmm_start()

    def _device_sink(self, dev: GuestDevice) -> DeviceDataSink:
        w = self.writer
        assert w is not None
        return lambda chunk: w.send_device_data(dev.name, chunk)

    # -- ACTIVE -----------------------------------------------------------------------
    def _precopy(self) -> None:
        tr, w, sender = self.tracker, self.writer, self.sender
        assert tr is not None and w is not None and sender is not None
        cfg = self.config
        start = self.clock()
        while True:
            self._check_cancel()
            self.iteration += 1
            # with a VMM half, device-written pages wait for the switchover (vmm_source.py)
            ram = 0 if self.vmm is not None else sender.send(
                tr.take_dirty_runs(cfg.max_run_pages), quiescent=False,
                zero_scan=self.iteration == 1 and cfg.zero_scan_first_pass)
            dev_bytes = 0
            for d in self.guest.devices:
                if d.driver.has_precopy:
                    t0 = self.clock()
                    b0 = w.bytes_sent
                    dev_bytes += self._hook(d, d.driver.save_live_iterate,
                                            self._device_sink(d), cfg.device_iterate_bytes)
                    self.predictor.bandwidth.record(t0, self.clock(), w.bytes_sent - b0)
            t_mark, c_mark = self.clock(), time.thread_time()
            w.mark_iteration(self.iteration)
            # predict from an empty pipe; waiting before the re-hash times the path alone
            self._await_pass(self.iteration, t_mark, ram + dev_bytes,
                             time.thread_time() - c_mark)
            assert self.digests is not None
            self.digests.pass_ended()      # re-hash, and fold into the digests
            sync = tr.sync("precopy")
            t0 = self.clock()
            pendings = [self._hook(d, d.driver.save_live_pending) for d in self.guest.devices]
            self._arcs.add(self.clock() - t0)
            decision = self._predict(sync, pendings, start, ram, dev_bytes)
            if decision is Decision.CANCEL:
                raise Cancelled(self.result.history[-1].reason, by="policy")
            if self.vmm is not None:     # the VMM decides when: at its pre-switchover wait
                if self._vmm_waits_to_switch(self.clock() + VMM_PASS_S):
                    return
                continue
            if decision in (Decision.SWITCHOVER, Decision.FORCE):
                return
            if ram == 0 and dev_bytes == 0 and cfg.idle_pass_s > 0:
                # nothing new to send: let dirty data accumulate (a cancel ends the wait)
                self._cancel.wait(cfg.idle_pass_s)

    # -- DEVICE -----------------------------------------------------------------------
    def _stop_and_copy(self) -> None:
        tr, w, sender, dg = self.tracker, self.writer, self.sender, self.digests
        assert tr is not None and w is not None and sender is not None and dg is not None
        self._check_cancel()
        devs = self.guest.devices
        t = self.result.timings
        self._stop_t = self.clock()
        if self._vmm_last_migrating_t is not None:   # its vCPUs stopped after this poll
            self._stop_t = self._vmm_last_migrating_t
        self.guest.pause(GuestState.FINISH_MIGRATE)
        self._vmm_switch()
        t0 = t["pause_s"] = self.clock()
        if devs and all(d.driver.has_p2p for d in devs):
            for d in devs:              # no device may DMA into a peer that has stopped
                self._hook(d, d.driver.quiesce_p2p)
        t["p2p_quiesce_s"] = self.clock() - t0
        for d in devs:
            b0 = w.bytes_sent
            t1 = self.clock()
            self._hook(d, d.driver.save_live_complete_precopy, self._device_sink(d))
            self.predictor.bandwidth.record(t1, self.clock(), w.bytes_sent - b0)
        t["device_stop_copy_s"] = self.clock() - t0
        t0 = self.clock()
        t["pause_s"] -= self._stop_t
        sync = tr.sync("stopcopy")
        t["final_sync_s"] = sync.duration_s
        self.history.record_opted_out(sync.opted_out_new_pages, sync.opted_out_mapped_pages,
                                      self.clock() - self._tracking_t0)
        ram = sender.send(tr.take_dirty_runs(self.config.max_run_pages), quiescent=True)
        t["final_ram_s"] = self.clock() - t0
        self.result.verification["final_ram_bytes"] = ram
        for d in devs:
            w.end_of_state(d.name)
        manifest = w.finish()
        t1 = self.clock()
        t["final_stream_s"] = t1 - t0 - sync.duration_s   # RAM, END_OF_STATE, MANIFEST
        t["stream_end_s"] = t1 - t0 - t["final_ram_s"]    # END_OF_STATE, MANIFEST
        dg.rehash()
        regions = [r.to_dict() for r in dg.roots()]
        t["source_final_rehash_s"] = self.clock() - t1      # the re-hash and the digests
        self.result.verification.update(source_regions=regions,
                                        manifest_records=manifest.records,
                                        **dg.figures("source_"))
        if self.vmm is not None:
            self.result.predicted_downtime_s = self._vmm_predicted_s(
                self.result.predicted_downtime_s)
        self.link.send_control(ControlMessage.digests(     # the destination reports it too
            manifest.records, regions,
            predicted_downtime_s=self.result.predicted_downtime_s))
