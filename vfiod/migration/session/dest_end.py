"""How a destination session ends: prepared, committed, unsettled or discarded
(docs/architecture.md §1.5 "Commit and verify", §1.6, §1.7; docs/protocol.md §8.4).

    prepare    journal "prepared" (``SwitchoverJournal.prepared``), then ACK prepared:
               from here no cancel, and no discard on this end's own initiative.
    commit     the source's COMMIT must name this migration and answer this connection's
               challenge. Journal "resuming", then ``resume`` each device (STOP ->
               RUNNING), guest RUNNING, ACK resumed, the source's REPORT, ``cleanup``.
    unsettled  no COMMIT and no CANCEL (the link died, a timeout, a COMMIT that does not
               answer the challenge, a journal that cannot record the resume): the guest
               does not run, its devices stay loaded and stopped; ``settle(commit)``
               resumes or discards once the source's decision is known.
    discard    ``rollback`` every device this attempt loaded (a reset), write zeros over
               the RAM it received, never run the guest; tell the source (ERROR, or
               CANCEL for this end's own cancel; nothing when the source aborted) and read
               the stream to its end so the source sees why.
"""

from __future__ import annotations

import secrets
import time

from vfiod.errors import PreflightError, ProtocolError
from vfiod.migration.session.common import Cancelled, MigrationResult, SessionBase
from vfiod.migration.session.ram_files import zero_ram
from vfiod.migration.states import GuestState, MigrationState
from vfiod.migration.stream.header import StreamHeader
from vfiod.migration.stream.reader import StreamReader
from vfiod.migration.stream.records import ErrorCode, RecordError
from vfiod.migration.transport.control import (
    AckStage,
    ControlMessage,
    ControlType,
    TransportCode,
    TransportError,
)


class DestinationEnding(SessionBase):
    """The end of ``DestinationSession`` (its base: it uses the session's reader, header
    and the devices it loaded)."""

    reader: StreamReader | None
    header: StreamHeader | None
    _loading: set[str]
    _stopped_at: float | None
    _load_s: float

    def _prepare(self) -> None:
        """Journal "prepared": past it this end neither cancels nor discards on its own
        (a journal that cannot be written fails the migration: nothing was promised)."""
        started = self.clock()
        self._commit_recorded(self.journal.prepared)
        self.result.timings["journal_prepared_s"] = self.clock() - started

    def _await_commit(self) -> None:
        msg = self.link.wait_control(ControlType.COMMIT, self.config.ack_timeout_s)
        if (msg.fields.get("migration_id") != self.migration_id
                or not secrets.compare_digest(str(msg.fields.get("challenge", "")),
                                              self.challenge)):
            raise ProtocolError("a COMMIT that does not name this migration or answer "
                                "this connection's challenge is ignored")

    def _commit_received(self) -> MigrationResult:
        started = self.clock()
        try:
            self.journal.resuming(self.migration_id)
        except Exception as e:  # noqa: BLE001 - no record, no resume: stay prepared
            return self._unsettled(e)
        self.result.timings["journal_resume_s"] = self.clock() - started
        try:
            self._resume()
            self.link.send_control(ControlMessage.ack(
                AckStage.RESUMED, verified=True, verification=self.result.verification,
                timings=dict(self.result.timings)))
        except TransportError as e:     # it runs here; the source learns it by asking
            self.result.warnings.append(f"could not acknowledge the resume: {e}")
        except Exception as e:  # noqa: BLE001 - a device would not run: give it back
            return self._discard(e)
        self._await_report()
        return self._completed()

    def _completed(self) -> MigrationResult:
        self._set_state(MigrationState.COMPLETED)
        self._cleanup_devices()
        return self._result("completed", "")

    def _resume(self) -> None:
        t0 = self.clock()
        for d in self.guest.devices:
            self._hook(d, d.driver.resume)
        self.guest.set_run_state(GuestState.RUNNING)
        now = self.clock()
        r = self.result
        r.timings["resume_s"] = now - t0
        r.timings["load_s"] = self._load_s        # the source's downtime breakdown shows it
        r.downtime_share = {"total_s": now - (self._stopped_at or t0), "load_s": self._load_s,
                            "verify_s": r.verification["final_verify_s"],
                            "resume_s": now - t0}

    def _unsettled(self, exc: Exception) -> MigrationResult:
        return self._leave_unsettled(
            exc, "prepared, but the source's decision", "the guest does not run here and "
            "its devices stay loaded until the source's journal settles the outcome",
            "outcome unknown after PREPARED")

    def settle(self, commit: bool, why: str) -> MigrationResult:
        """End an unsettled migration on the source's decision: it committed (resume here;
        raises if the journal cannot record it, and stays unsettled) or it did not
        (discard)."""
        self._settling()
        if not commit:
            self._undo()
            self._set_state(MigrationState.FAILED)
            return self._result("failed", f"discarded: {why}")
        self.journal.resuming(self.migration_id)
        try:
            self._resume()
        except Exception as e:  # noqa: BLE001 - a device would not run: give it back
            self._undo()
            self._set_state(MigrationState.FAILED)
            return self._result("failed", f"discarded: resuming failed: {e}")
        self.error = None
        return self._completed()

    def _await_report(self) -> None:
        """The source's REPORT (its downtime, prediction and error), waited for briefly:
        the guest runs here already, so the wait adds nothing to the downtime, and without
        it the migration still completes."""
        try:
            msg = self.link.wait_control(ControlType.REPORT, self.config.report_timeout_s)
            self.result.take_downtime_report(msg.fields)
        except (TransportError, ProtocolError) as e:
            self.result.warnings.append(f"source report not received: {e}")

    # -- discard ------------------------------------------------------------------------
    def _discard(self, exc: BaseException) -> MigrationResult:
        self.error = f"{type(exc).__name__}: {exc}"
        aborted = (isinstance(exc, RecordError) and exc.code is ErrorCode.ABORTED
                   or isinstance(exc, TransportError)
                   and exc.code is TransportCode.PEER_CANCELLED)
        cancelled = aborted or isinstance(exc, Cancelled)
        tell = not aborted
        if self.committed and tell:
            try:        # prepared: the source resumes on our word, so write it down first
                self.journal.discarding(self.migration_id)
            except Exception as e:  # noqa: BLE001 - then say nothing: the source asks
                self.result.warnings.append(f"discarded, but could not journal it: {e}")
                tell = False
        if tell:
            code = exc.code.name if isinstance(exc, RecordError) else type(exc).__name__
            msg = (ControlMessage.cancel(exc.reason) if isinstance(exc, Cancelled) else
                   ControlMessage.error(code, str(exc),
                                        self.reader.records if self.reader else None))
            try:
                self.link.send_control(msg)
            except Exception as e:  # noqa: BLE001 - the link may be what failed
                self.result.warnings.append(f"could not tell the source: {e}")
        self._undo()
        if isinstance(exc, PreflightError):
            self.result.verification["preflight"] = exc.reasons
        self.result.verified = False if self.result.verified is None else self.result.verified
        if tell and self.reader is not None:
            self._drain()
        if cancelled:
            self._set_state(MigrationState.CANCELLING)
        final = MigrationState.CANCELLED if cancelled else MigrationState.FAILED
        self._set_state(final)
        return self._result("cancelled" if cancelled else "failed", str(exc))

    def _undo(self) -> None:
        """Discard: every device this attempt loaded is reset, the RAM it wrote goes back
        to zero, and the guest is not run."""
        if self.reader is not None:
            self.reader.stop_channels()     # no RAM channel writes guest memory after this
        self._rollback_devices(d for d in self.guest.devices if d.name in self._loading)
        if self.header is not None:
            g = self.guest
            try:
                self.result.verification["discarded_pages"] = zero_ram(
                    g.kernel, g.ram, g.page_size)
            except Exception as e:  # noqa: BLE001 - the guest is not run either way
                self.result.warnings.append(f"zeroing the received RAM: {e}")
        try:
            self.guest.set_run_state(GuestState.PAUSED)   # never run what was loaded
        except Exception as e:  # noqa: BLE001
            self.result.warnings.append(f"pausing the guest: {e}")

    def _drain(self) -> None:
        """Read and drop the stream until the source's ABORT/EOF or the deadline, so the
        source sees our ERROR before the connection goes away."""
        buf = memoryview(bytearray(1 << 16))
        deadline = time.monotonic() + self.config.ack_timeout_s
        while time.monotonic() < deadline:
            try:
                if self.link.recv_into(buf) == 0:
                    return
            except Exception:  # noqa: BLE001 - closed, reset or timed out: done
                return
