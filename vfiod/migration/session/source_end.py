"""How a source session ends: the confirmed switchover, completion, rollback, and the
unsettled outcome (docs/architecture.md §1.5 "Commit and verify", §1.6, §1.7;
docs/protocol.md §8.4).

    prepared   the destination's ACK prepared: it loaded and verified everything, its
               devices wait stopped. Its verification is taken into the result.
    commit     the decision is journaled first (``SwitchoverJournal.committing``); from
               then on a cancel is refused and nothing here resumes on its own. Then
               COMMIT (migration id and the connection's challenge).
    resumed    ACK resumed: the downtime is measured and REPORTed; ``cleanup`` the
               devices, stop tracking, guest POSTMIGRATE, release the fds.
    unsettled  no ACK resumed (the link died, a timeout, any error after the commit):
               tracking stops, the guest stays paused, the devices keep their state.
               ``settle(peer_resumed)`` finishes as above, or rolls back and resumes the
               guest here, once the destination's answer is known.

A failure before the commit record rolls back: ABORT (or, once the stream has ended, a
CANCEL frame) tells the destination to discard; every device back to RUNNING; the guest
resumes.
"""

from __future__ import annotations

from typing import Any

from vfiod.dirty.tracker import DirtyTracker
from vfiod.errors import KernelError, PreflightError
from vfiod.migration.planning.breakdown import actual_parts, breakdown
from vfiod.migration.planning.predictor import DowntimePredictor, FixedCosts
from vfiod.migration.session.common import MigrationResult
from vfiod.migration.session.history import SwitchoverHistory
from vfiod.migration.session.phases import RamSender
from vfiod.migration.session.vmm_source import SourceVmmSteps
from vfiod.migration.states import GuestState, MigrationState
from vfiod.migration.stream.writer import StreamWriter
from vfiod.migration.transport.control import (
    AckStage,
    ControlMessage,
    TransportCode,
    TransportError,
)


class SourceEnding(SourceVmmSteps):
    """The end of ``SourceSession`` (its base: it uses the session's writer, tracker and
    predictor)."""

    writer: StreamWriter | None
    sender: RamSender | None
    tracker: DirtyTracker | None
    predictor: DowntimePredictor
    _stop_t: float | None
    _predicted_parts: dict[str, float]
    _measured_costs: FixedCosts
    _uncorrected_parts: dict[str, float]
    history: SwitchoverHistory

    # -- the confirmed switchover ---------------------------------------------------------
    def _await_prepared(self) -> None:
        ack = self.link.wait_ack(AckStage.PREPARED, self.config.ack_timeout_s)
        self.result.take_verification_ack(ack.fields)   # its verification, as it reports it

    def _commit_switchover(self) -> None:
        """Journal the decision, then nothing rolls back here on its own. A journal that
        cannot be written means no decision: the caller rolls back."""
        started = self.clock()
        self._commit_recorded(self.journal.committing)
        self.result.timings["journal_commit_s"] = self.clock() - started

    def _after_commit(self) -> MigrationResult:
        try:
            self.link.send_control(ControlMessage.commit(self.migration_id, self.challenge))
            self._await_destination()
        except TransportError as e:
            if e.code in (TransportCode.PEER_ERROR, TransportCode.PEER_CANCELLED):
                # its word, sent only once its journal says discarded: resume here
                return self._resume_here(f"the destination discarded it after the commit: "
                                         f"{e}")
            return self._unsettled(e)
        except Exception as e:  # noqa: BLE001 - after the commit every failure is "unknown"
            return self._unsettled(e)
        self._set_state(MigrationState.COMPLETED)
        self._finish()
        self._vmm_completed()
        return self._result("completed", "")

    def _await_destination(self) -> None:
        assert self._stop_t is not None
        ack = self.link.wait_ack(AckStage.RESUMED, self.config.ack_timeout_s)
        actual_s, r = self.clock() - self._stop_t, self.result
        theirs = ack.fields.get("timings")
        # with a VMM half, vfiod's own parts are what its wait for the VMM leaves
        vmm_s = _seconds(theirs, "vmm_incoming_wait_s")
        out = self.predictor.record_actual(max(0.0, actual_s - vmm_s))
        r.actual_downtime_s, r.predicted_downtime_s = actual_s, out.predicted_s
        r.prediction_error = out.error
        if self.vmm is not None:
            self._vmm_measured(actual_s, vmm_s)
            r.predicted_downtime_s = self._vmm_predicted_s(out.predicted_s)
            r.prediction_error = (None if r.predicted_downtime_s is None or actual_s <= 0
                                  else abs(r.predicted_downtime_s - actual_s) / actual_s)
        r.take_verification_ack(ack.fields)
        r.downtime_breakdown = self._breakdown(out.actual_s, theirs)
        try:            # the guest runs there already: this adds nothing to the downtime
            self.link.send_control(r.downtime_report())
        except TransportError as e:
            r.warnings.append(f"could not send the downtime report: {e}")

    def _breakdown(self, actual_s: float, theirs: Any) -> dict[str, dict[str, float]]:
        """Predicted vs measured, part by part; ``theirs``: the destination's timings
        (its ACK resumed)."""
        t = self.result.timings
        dest = theirs if isinstance(theirs, dict) else {}

        def dest_s(key: str) -> float:
            return _seconds(dest, key)
        actual = actual_parts(
            actual_s, device_stop_s=t["pause_s"] + t["device_stop_copy_s"],
            final_sync_s=t["final_sync_s"], ram_transfer_s=max(0.0, t["final_stream_s"]),
            verify_s=max(t["source_final_rehash_s"], dest_s("dest_final_rehash_s"))
            + dest_s("dest_compare_s"),
            dest_load_resume_s=dest_s("load_s") + dest_s("resume_s"),
            journal_s=t.get("journal_commit_s", 0.0) + dest_s("journal_prepared_s")
            + dest_s("journal_resume_s"))
        w, s = self.writer, self.sender
        self.history.record(self._measured_costs, self._uncorrected_parts, actual,
                            w.device_bytes_sent if w is not None else 0,
                            stream_end_s=t.get("stream_end_s", 0.0),
                            final_records=s.pass_records if s is not None else 0)
        return breakdown(self._predicted_parts, actual)

    def _result(self, kind: str, reason: str) -> MigrationResult:
        r = super()._result(kind, reason)
        w = self.writer
        if w is not None:
            r.ram_bytes_sent = w.ram_bytes_sent
            r.device_bytes_sent = w.device_bytes_sent
            r.stream_bytes = w.bytes_sent
        if self.sender is not None:
            r.timings["zero_scan_s"] = self.sender.scan_seconds
            r.verification["zero_pages_skipped"] = self.sender.skipped_zero_pages
        return r

    def _unsettled(self, exc: Exception) -> MigrationResult:
        self._stop_tracking()
        return self._leave_unsettled(
            exc, "committed, but the destination's answer", "the guest stays paused here "
            "with its device state until the destination's journal settles the outcome",
            "outcome unknown after the commit")

    def settle(self, peer_resumed: bool, why: str) -> MigrationResult:
        """End an unsettled migration on the destination's answer: it resumed the guest
        (finish here), or it did not and never will (roll back and resume here)."""
        self._settling()
        if peer_resumed:
            self.error = None
            self._set_state(MigrationState.COMPLETED)
            self._finish()
            return self._result("completed", "")
        return self._resume_here(why)

    def _resume_here(self, why: str) -> MigrationResult:
        """The destination will never run it: devices back to RUNNING, the guest resumes."""
        self._rollback_devices(self.guest.devices)
        self._stop_tracking()
        self._vmm_abandon()
        self._resume_guest()
        self._set_state(MigrationState.FAILED)
        return self._result("failed", f"rolled back: {why}")

    # -- completion -------------------------------------------------------------------
    def _finish(self) -> None:
        self._cleanup_devices()
        self._stop_tracking()
        try:
            self.guest.set_run_state(GuestState.POSTMIGRATE)
        except Exception as e:  # noqa: BLE001 - the migration stands; say what broke
            self.result.warnings.append(f"guest run-state handler: {e}")
        if self.config.release_on_complete:
            try:
                self.guest.release_devices()
            except KernelError as e:
                self.result.warnings.append(f"releasing device fds: {e}")

    def _stop_tracking(self) -> None:
        if self.tracker is not None and self.tracker.running:
            try:
                self.tracker.stop()
            except Exception as e:  # noqa: BLE001
                self.result.warnings.append(f"stopping dirty tracking: {e}")

    def _resume_guest(self) -> None:
        if self.guest.run_state is not GuestState.RUNNING:
            try:
                self.guest.resume()
            except Exception as e:  # noqa: BLE001
                self.result.warnings.append(f"resuming the guest: {e}")

    # -- rollback (docs/architecture.md §1.6) ---------------------------------------------
    def _rollback(self, final: MigrationState, exc: BaseException) -> MigrationResult:
        if final is MigrationState.CANCELLED:
            self._set_state(MigrationState.CANCELLING)
        reason = str(exc)
        self.error = f"{type(exc).__name__}: {reason}"
        self._tell_destination_to_discard(reason)
        self._rollback_devices(self.guest.devices)
        self._stop_tracking()
        self._vmm_abandon()
        self._resume_guest()
        self._set_state(final)
        kind = "cancelled" if final is MigrationState.CANCELLED else "failed"
        if isinstance(exc, PreflightError):
            self.result.verification["preflight"] = exc.reasons
        return self._result(kind, reason)

    def _tell_destination_to_discard(self, reason: str) -> None:
        w = self.writer
        if w is None:
            return
        try:
            if w.finished:                   # the stream has ended: no ABORT record fits
                self.link.send_control(ControlMessage.cancel(reason))
            else:
                w.abort(reason)
        except Exception as e:  # noqa: BLE001 - the link may be what failed
            self.result.warnings.append(f"could not tell the destination to discard: {e}")


def _seconds(timings: Any, key: str) -> float:
    """A duration the peer reported in ``timings``; 0 when missing or not a number."""
    v = timings.get(key) if isinstance(timings, dict) else None
    return float(v) if isinstance(v, int | float) and v >= 0 else 0.0
