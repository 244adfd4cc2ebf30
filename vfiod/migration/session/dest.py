"""The destination side of a live migration (docs/architecture.md §1 steps 5-6; docs/kernel-contract.md §5.6,
§6.10 destination flow; the seed's load hooks).

    SETUP    send this host's facts (ACK hello); read the HEADER; check it against this
             guest (page size, memory layout, devices paired by id: identity, protocol,
             flags) and refuse with every reason (ERROR) before any byte is written; attach
             this guest's RAM as the place RAM records land; ACK header.
    ACTIVE   RAM records land in guest memory (CRC checked in place by the reader, or a
             RAM channel's thread), and those per-page CRCs are the pages' content digests
             (docs/protocol.md §7.3: no page is read twice); each device's first data
             chunk is the source's ``save_state`` record: ``check_state`` then
             ``load_setup`` (RESUMING); the following chunks go to ``load_state`` in
             order; ITERATION marks are acknowledged at once (pass acknowledgements).
    DEVICE   from the first END_OF_STATE: ``load_complete`` per device as its state ends
             (the kernel driver validates it, RESUMING -> STOP); the MANIFEST is verified
             by the reader (record counts, bytes, digests per region and device).
    verify   wait for the source's content digests (control frame DIGESTS), compare
             every region.
    prepare  journal "prepared" (``SwitchoverJournal.prepared``); from here no cancel and
             no discard on this end's own initiative; ACK prepared (with the
             verification); wait for the source's COMMIT, which must name this migration
             and answer this connection's challenge.
    resume   journal "resuming"; ``resume`` each device (STOP -> RUNNING), guest RUNNING,
             ACK resumed; the source's REPORT; ``cleanup``.

The HELLO carries a fresh random challenge; a HEADER that does not answer it (a replayed
or foreign stream), or that names another migration id than the one the daemon admitted,
is refused before any byte is written (docs/protocol.md §8.4).

Prepared, the destination never resumes and never discards on its own: a source CANCEL
discards; a COMMIT resumes; anything else (the link dies, a timeout, a COMMIT that does
not answer the challenge) leaves the result ``unsettled``, the guest not running and its
devices loaded and stopped, until ``settle`` is told the source's decision
(docs/architecture.md §1.7). A device that fails to resume after COMMIT discards
everything (its journal then says discarded, and the source resumes with its own state).

The destination reports its own share of the downtime (``downtime_share``: from the
source's stopped device state arriving to the guest resumed, with its load, verify and
resume parts) and the source's predicted downtime, which the DIGESTS frame carries
(docs/protocol.md §8.3). The downtime itself and the prediction error are the source's:
it measures them when ACK resumed arrives and sends them in a REPORT frame, which this end
waits for briefly after resuming (``report_timeout_s``; the guest runs already, so the
wait adds nothing to the downtime). Without it the migration still completes, with the
warning "source report not received".

The source does not send pages it never wrote, so the destination first writes zeros over
any page of its RAM that holds data (a reused RAM file); fresh memfds cost only the scan. Nothing runs unverified: on any failure (bad header, stream
error, a device refusing its state, a digest mismatch, the source's ABORT) the destination
sends ERROR (CANCEL for its own cancel; nothing when the source aborted), ``rollback``s
every device it loaded (a reset: what was loaded is discarded, the device is back to
RUNNING with its power-on state), writes zeros over every page it received, and never
starts the guest: it is ready for another attempt. After sending ERROR it keeps reading the stream until the source's ABORT or EOF
(bounded by the ack timeout) so that the source reads the ERROR before the connection
closes.
"""

from __future__ import annotations

import secrets
from typing import Any

from vfiod.errors import PreflightError, ProtocolError
from vfiod.migration.guest import GuestDevice
from vfiod.migration.planning.preflight import GuestFacts, MigrationFacts, compare
from vfiod.migration.session.channels import DestChannels
from vfiod.migration.session.common import (
    MigrationResult,
    SessionBase,
    VerificationError,
)
from vfiod.migration.session.dest_end import DestinationEnding
from vfiod.migration.session.digest import RamDigests, RegionDigest, compare_roots
from vfiod.migration.session.first_touch import measure_first_touch_s
from vfiod.migration.session.ram_files import zero_ram
from vfiod.migration.session.switchover_warm_up import warm_switchover
from vfiod.migration.session.vmm_dest import DestVmmSteps
from vfiod.migration.session.vmm_half import VmmDestinationHalf
from vfiod.migration.states import GuestState, MigrationState
from vfiod.migration.stream.events import (
    Complete,
    DeviceData,
    EndOfState,
    IterationMark,
    RamLoaded,
    RamRunsLoaded,
)
from vfiod.migration.stream.header import StreamHeader
from vfiod.migration.stream.ram import GuestRam
from vfiod.migration.stream.reader import StreamReader
from vfiod.migration.transport.control import (
    AckStage,
    ControlMessage,
    ControlType,
    TransportCode,
    TransportError,
)


class DestinationSession(DestChannels, DestinationEnding, DestVmmSteps, SessionBase):
    role = "destination"

    def __init__(self, *args: Any, vmm: VmmDestinationHalf | None = None,
                 **kw: Any) -> None:
        """``SessionBase``'s arguments; ``vmm``: the VMM's half of a coordinated
        migration (docs/architecture.md §8.3), None for vfiod alone."""
        super().__init__(*args, **kw)
        self.vmm = vmm
        self._shadow = []
        self._received_runs = []
        self.reader: StreamReader | None = None
        self.header: StreamHeader | None = None
        self.digests: RamDigests | None = None
        self._by_index: list[GuestDevice] = []
        self._loading: set[str] = set()
        self._aborted_by_source = False
        self._stopped_at: float | None = None      # the source's device state arriving
        self._load_s = 0.0

    def _bytes(self) -> tuple[int, int]:
        return 0, (self.reader.offset if self.reader else self.result.stream_bytes)

    # -- the whole migration ----------------------------------------------------------
    def run(self) -> MigrationResult:
        """Receive; returns the result (never raises for a migration failure). The caller
        closes the link afterwards."""
        try:
            return self._run()
        finally:
            self.reader = None          # it holds writable views of guest memory
            self.digests = None
            self._close_shadow()

    def _run(self) -> MigrationResult:
        self.started_at = self.clock()
        try:
            self.guest.set_run_state(GuestState.INMIGRATE)   # nothing runs it until resume
            self._set_state(MigrationState.SETUP)
            self._handshake()
            self._set_state(MigrationState.ACTIVE)
            self._receive()
            self._verify()
            self._vmm_apply()
            self._prepare()
        except BaseException as e:
            res = self._discard(e)
            if not isinstance(e, Exception):
                raise
            return res
        try:
            self.link.send_control(ControlMessage.ack(
                AckStage.PREPARED, verified=True, verification=self.result.verification,
                timings=dict(self.result.timings)))
            self._await_commit()
        except TransportError as e:
            if e.code is TransportCode.PEER_CANCELLED:     # the source decided: discard
                return self._discard(e)
            return self._unsettled(e)
        except ProtocolError as e:
            return self._unsettled(e)
        return self._commit_received()

    # -- SETUP ------------------------------------------------------------------------
    def _handshake(self) -> None:
        g = self.guest
        warm_switchover()     # before the HELLO: the first downtime must not pay its first run
        # The source never sends pages it never wrote, so this RAM must start all zero. A
        # RAM file reused from an earlier run (a daemon's file-backed guest reopened as
        # incoming) may hold old data that would survive the migration unnoticed, since
        # the digests take unsent pages as zero: clear it first (holes stay holes).
        # With a VMM half the VMM fills guest RAM and vfiod's pages land in a fresh shadow.
        if self.vmm is None:
            stale = zero_ram(g.kernel, g.ram, g.page_size)
            self.result.verification["stale_pages_zeroed"] = stale
        landing = self._landing_blocks()
        # what a page its memory never held costs to land: the source's prediction counts it
        first_touch_s = self.result.timings["first_touch_s"] = measure_first_touch_s(
            g.kernel, landing, g.page_size)
        self.challenge = secrets.token_hex(16)
        self.link.send_control(ControlMessage.ack(AckStage.HELLO, facts=self.facts.to_json(),
                                                  challenge=self.challenge,
                                                  pass_acks=True, ram_runs=True,
                                                  first_touch_s=first_touch_s,
                                                  **self._vmm_hello(),
                                                  **self._channels_hello()))
        self.reader = StreamReader(self.link)
        h = self.header = self.reader.read_header()
        t_header = self.clock()
        if not secrets.compare_digest(h.challenge, self.challenge):
            raise ProtocolError("the stream's HEADER does not answer this connection's "
                                "challenge: a replayed or foreign stream is refused")
        if self.assigned_migration_id and h.migration_id != self.assigned_migration_id:
            raise ProtocolError(f"the stream's HEADER names migration {h.migration_id!r}, "
                                f"not {self.assigned_migration_id!r} as offered")
        self.result.migration_id = self.migration_id = h.migration_id
        self.result.peer["host"] = h.source_host
        theirs = MigrationFacts(self.facts.host, GuestFacts(
            h.guest, h.page_size, h.regions, h.devices,
            pinned_bytes=self.facts.guest.pinned_bytes))
        reasons = compare(theirs, self.facts)
        if reasons:
            raise PreflightError(reasons)
        mine = {d.id: d for d in g.devices}      # paired by id, as preflight checked
        self._by_index = [mine[d.id] for d in h.devices]
        ram = GuestRam(g.page_size, g.ram_regions(), [b.view() for b in landing],
                       writable=True)
        self.digests = RamDigests(g.ram_regions(), [b.view() for b in landing], g.page_size)
        # each landed page's CRC, checked by the reader, is its digest (§7.3): no re-read
        self.reader.attach_ram(ram, crcs=self.digests)
        # the time spent here is not network: the source subtracts it from its round trip
        self.link.send_control(ControlMessage.ack(AckStage.HEADER, self.reader.records,
                                                  busy_s=self.clock() - t_header))
        self._accept_channels(h.channels, ram, self.digests)

    # -- ACTIVE / DEVICE --------------------------------------------------------------
    def _receive(self) -> None:
        r, dg = self.reader, self.digests
        assert r is not None and dg is not None
        t = self.result.timings
        for ev in r.events():
            self._check_cancel()            # an operator's cancel, at the next record
            if isinstance(ev, RamLoaded):      # its CRCs are in the digests already
                self._landed(ev.first_page, ev.count)
            elif isinstance(ev, RamRunsLoaded):
                self._landed_runs(ev.runs)
            elif isinstance(ev, DeviceData):
                self._device_data(self._by_index[ev.index], ev)
            elif isinstance(ev, IterationMark):
                self.iteration = ev.number
                if self.header is not None and self.header.pass_acks:   # the pass is in
                    self.link.send_control(ControlMessage.ack(AckStage.PASS, ev.number,
                                                              busy_s=0.0))   # no re-hash
                dg.fold()               # now, not inside the downtime at the commit
            elif isinstance(ev, EndOfState):
                self._stopped_at = self._stopped_at or self.clock()
                if self.state is MigrationState.ACTIVE:
                    self._set_state(MigrationState.DEVICE)
                    t["device_phase_at_s"] = self.clock() - (self.started_at or 0.0)
                self._end_of_state(self._by_index[ev.index])
            elif isinstance(ev, Complete):
                self._stopped_at = self._stopped_at or self.clock()    # a guest without devices
                self.result.verification["manifest"] = {
                    "verified": True, "records": ev.manifest.records,
                    "ram_bytes": ev.manifest.ram_bytes,
                    "device_bytes": ev.manifest.device_bytes}

    def _device_data(self, dev: GuestDevice, ev: DeviceData) -> None:
        if ev.chunk == 0:
            self._hook(dev, dev.driver.check_state, ev.data)
            self._loading.add(dev.name)
            self._hook(dev, dev.driver.load_setup)
        else:
            self._hook(dev, dev.driver.load_state, ev.data)

    def _end_of_state(self, dev: GuestDevice) -> None:
        if dev.name not in self._loading:
            raise ProtocolError(f"device {dev.name}: END_OF_STATE before its state record")
        t0 = self.clock()
        self._hook(dev, dev.driver.load_complete)
        self._load_s += self.clock() - t0

    # -- verify / resume --------------------------------------------------------------
    def _verify(self) -> None:
        dg = self.digests
        assert dg is not None
        t = self.result.timings
        t0 = self.clock()
        dg.rehash()                   # nothing to read: each landed page came with its CRC
        t["dest_final_rehash_s"] = self.clock() - t0
        msg = self.link.wait_control(ControlType.DIGESTS, self.config.ack_timeout_s)
        t1 = self.clock()
        try:
            theirs = [RegionDigest.from_dict(x) for x in msg.fields.get("regions", [])]
        except ValueError as e:
            raise ProtocolError(f"source content digests: {e}") from None
        predicted = msg.fields.get("predicted_downtime_s")
        if isinstance(predicted, int | float):     # the source's, for this end's report
            self.result.predicted_downtime_s = float(predicted)
        mine = dg.roots()
        diffs = compare_roots(theirs, mine)
        t["dest_compare_s"] = self.clock() - t1
        v = self.result.verification
        v.update(regions=[r.to_dict() for r in mine], content_verified=not diffs,
                 **dg.figures(""),
                 final_verify_s=t["dest_final_rehash_s"] + t["dest_compare_s"])
        if diffs:
            raise VerificationError("RAM content differs from the source: " + "; ".join(diffs))
        self.result.verified = True

    def _result(self, kind: str, reason: str) -> MigrationResult:
        r = super()._result(kind, reason)
        if self.reader is not None:
            r.stream_bytes = self.reader.offset
        return r

