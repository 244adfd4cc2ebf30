"""The source session's steps when its migration is coordinated with the VMM's own
(docs/architecture.md §8.3; the contract: ``vmm_half.py``).

    handshake  both ends must agree: the destination's ACK hello names its VMM's incoming
               address exactly when this end has a VMM half (else preflight refuses,
               naming the end that is not configured for it).
    setup      tracking starts with no page dirty, then the VMM's migration starts.
    pre-copy   device state only; each pass asks the VMM whether it waits before its
               switchover. Its migration ending any other way fails this one.
    switch     the guest pauses (the VMM's vCPUs are already stopped), the VMM is let
               finish at once, and vfiod's stop-and-copy runs beside its final pass.
    rollback   the VMM's migration is cancelled if it still runs, before the guest's
               resume asks the VMM to run the vCPUs (a VMM that completed is resumed).

The downtime is measured end to end from the last poll that saw the VMM still migrating
(its vCPUs stopped after it): conservative by at most one poll. The two halves overlap:
the VMM's final pass runs while vfiod stops its devices and sends their state. The VMM's
own time is predicted as the RAM it has left over its measured rate plus its fixed cost
(its own downtime less that transfer, learned from this guest's previous migration on
this host: ``VMM_FIXED_S``, none before the first). It adds to the downtime only what
exceeds vfiod's own part up to the destination's verification. The result's ``vmm``
splits prediction and measurement into the VMM's share and the devices'.
"""

from __future__ import annotations

from typing import Any

from vfiod.errors import MigrationError
from vfiod.migration.planning.predictor import DowntimePredictor
from vfiod.migration.session.common import SessionBase
from vfiod.migration.session.vmm_half import VmmProgress, VmmSourceHalf

#: seconds between two questions to the VMM: at most this late (plus one question, about
#: a millisecond) vfiod sees the VMM's vCPUs stopped, which counts in the downtime
VMM_POLL_S = 0.003
#: seconds of questions between two pre-copy passes (device state, a dirty sync)
VMM_PASS_S = 0.1
#: guest name -> the VMM's fixed switchover cost its last migration from this host showed
VMM_FIXED_S: dict[str, float] = {}


class VmmMigrationFailed(MigrationError):
    """The VMM's own migration ended without switching over."""


class SourceVmmSteps(SessionBase):
    """Mixed into ``SourceSession``; every step is a no-op without a VMM half."""

    vmm: VmmSourceHalf | None
    _vmm_incoming: str
    _vmm_last_migrating_t: float | None
    _vmm_stopped: VmmProgress | None
    _predicted_parts: dict[str, float]
    predictor: DowntimePredictor

    def _vmm_disagreement(self, hello: dict[str, Any]) -> list[str]:
        """Preflight reasons when only one end coordinates with a VMM."""
        self._vmm_incoming = str(hello.get("vmm_incoming") or "")
        if self.vmm is not None and not self._vmm_incoming:
            return ["this guest's migration is coordinated with QEMU ([guest.qemu]) but the "
                    "destination's is not: give the destination guest [guest.qemu] with "
                    "qmp and incoming"]
        if self.vmm is None and self._vmm_incoming:
            return ["the destination's guest is coordinated with QEMU ([guest.qemu] "
                    "incoming) but this one is not: configure both ends alike"]
        return []

    def _vmm_start(self) -> None:
        if self.vmm is not None:
            t0 = self.clock()
            self._vmm_last_migrating_t = t0
            self.vmm.start(self._vmm_incoming)
            self.result.timings["vmm_start_s"] = self.clock() - t0

    def _vmm_waits_to_switch(self, until: float) -> bool:
        """True once the VMM stopped its vCPUs and waits before its switchover; asks
        every ``VMM_POLL_S`` until ``until`` (False then: time for a pre-copy pass)."""
        assert self.vmm is not None
        while True:
            self._check_cancel()
            t0 = self.clock()
            p = self.vmm.progress()
            self.result.vmm["progress"] = p.to_dict()
            if p.status == "pre-switchover":
                self._vmm_stopped = p
                return True
            if not p.migrating:
                raise VmmMigrationFailed(f"QEMU's own migration ended {p.status} before its "
                                         "switchover" + (f": {p.error}" if p.error else ""))
            self._vmm_last_migrating_t = t0
            if self.clock() >= until:
                return False
            self._cancel.wait(VMM_POLL_S)

    def _vmm_switch(self) -> None:
        """The guest is paused: let the VMM finish beside vfiod's stop-and-copy."""
        if self.vmm is not None:
            t0 = self.clock()
            self.vmm.continue_switchover()
            self.result.timings["vmm_continue_s"] = self.clock() - t0

    def _vmm_abandon(self) -> None:
        if self.vmm is None or self._vmm_last_migrating_t is None:
            return                  # never started: nothing of the VMM's to undo
        try:
            p = self.vmm.abandon()
            self.result.vmm["abandoned"] = p.to_dict()
        except Exception as e:  # noqa: BLE001 - the guest's resume still runs
            self.result.warnings.append(f"cancelling QEMU's migration: {e}")

    def _vmm_transfer_s(self) -> float:
        """The VMM's RAM left at its stop over the faster of its rate and vfiod's estimate
        of the link: its last pass is not held to its own bandwidth cap."""
        p = self._vmm_stopped
        if p is None:
            return 0.0
        bps = max(p.bandwidth_bps or 0.0, self.predictor.bandwidth.bps)
        return p.remaining_bytes / bps if bps > 0 else 0.0

    def _vmm_own_s(self) -> float:
        """The VMM's predicted time from its stop to its incoming migration done."""
        return self._vmm_transfer_s() + VMM_FIXED_S.get(self.guest.name, 0.0)

    def _vmm_predicted_s(self, devices_s: float | None) -> float | None:
        """Both halves' predicted downtime: vfiod's, plus what the VMM's own time
        exceeds of vfiod's part before the destination's verification."""
        own = self._vmm_own_s()
        parts = self._predicted_parts
        before_verify = (devices_s or 0.0) - parts.get("commit_round_trips", 0.0) \
            - parts.get("dest_load_resume", 0.0) - parts.get("journal", 0.0)
        extra = max(0.0, own - before_verify)
        self.result.vmm["predicted"] = {"vmm_s": extra, "devices_s": devices_s,
                                        "vmm_own_s": own}
        return None if devices_s is None else devices_s + extra

    def _vmm_measured(self, actual_s: float, dest_wait_s: float) -> None:
        """The measured split: the VMM's share is what the destination waited for its
        VMM after vfiod's own state was verified; the devices' share is the rest."""
        self.result.vmm["actual"] = {"vmm_s": dest_wait_s,
                                     "devices_s": max(0.0, actual_s - dest_wait_s)}

    def _vmm_completed(self) -> None:
        if self.vmm is None:
            return
        try:
            done = self.vmm.completed()
        except Exception as e:  # noqa: BLE001 - the migration stands; say what broke
            self.result.warnings.append(f"reading QEMU's final migration figures: {e}")
            return
        self.result.vmm["completed"] = done.to_dict()
        if done.downtime_s is not None and self._vmm_stopped is not None:
            VMM_FIXED_S[self.guest.name] = max(0.0, done.downtime_s - self._vmm_transfer_s())
