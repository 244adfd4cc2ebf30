"""A guest's run state followed by its VMM (docs/architecture.md §8.2): the run-state
handler a guest configured with ``runstate = "qmp:PATH"`` or ``"lines:PATH"`` gets, so
that when a migration pauses the guest (the source's switchover) the VMM stops its vCPUs
first, and when one resumes it (a destination after the commit, a source after a
rollback) the VMM starts them.

The handler runs inside ``Guest.set_run_state``: a VMM that does not acknowledge a pause
within ``runstate_timeout_s`` raises ``RunStateError`` there, before any device was
stopped, so the source session rolls back (devices back to RUNNING, the guest resumed,
which asks the VMM to resume too) and the migration ends failed with that error.
"""

from __future__ import annotations

import logging
import time

from vfiod.daemon.runstate.contract import RunStateBackend, RunStateError
from vfiod.daemon.runstate.lines import LineRunState
from vfiod.daemon.runstate.qmp import QmpRunState
from vfiod.migration.states import GuestState

log = logging.getLogger("vfiod.runstate")


def backend_for(spec: str) -> RunStateBackend:
    """The backend ``spec`` names: ``qmp:PATH`` or ``lines:PATH`` (checked by config)."""
    kind, _, path = spec.partition(":")
    if kind == "qmp":
        return QmpRunState(path)
    if kind == "lines":
        return LineRunState(path)
    raise ValueError(f"run-state backend {spec!r}: expected qmp:PATH or lines:PATH")


class VmmRunStateHandler:
    """Pauses the VMM when the guest leaves RUNNING, resumes it when it comes back."""

    def __init__(self, guest: str, backend: RunStateBackend, timeout_s: float) -> None:
        self.guest = guest
        self.backend = backend
        self.timeout_s = timeout_s

    def __call__(self, old: GuestState, new: GuestState) -> None:
        if new is GuestState.RUNNING:
            what, call = "resume", self.backend.resume
        elif old is GuestState.RUNNING:
            what, call = "pause", self.backend.pause
        else:
            return                   # paused to another paused state: the VMM stays put
        t0 = time.monotonic()
        try:
            st = call(t0 + self.timeout_s)
        except RunStateError as e:
            raise RunStateError(e.kind, f"guest {self.guest}: the VMM did not {what} "
                                f"within {self.timeout_s:g} s: {e}") from None
        log.info("guest %s: VMM %sd in %.1f ms (%s%s)", self.guest, what,
                 (time.monotonic() - t0) * 1000, st.state,
                 f", events {', '.join(st.events)}" if st.events else "")
