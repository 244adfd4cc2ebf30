"""The run-state contract between vfiod and a VMM (docs/architecture.md §8.2).

At switchover vfiod asks the VMM to stop its vCPUs, and on the destination to start
them. Each request carries an absolute deadline (``time.monotonic()`` seconds) and
returns only once the VMM acknowledged the new state, read back from the VMM: ``pause``
returns a ``RunStatus`` that is not running, ``resume`` one that is. A VMM that does
not answer by the deadline, refuses, or answers with a state that contradicts the
request raises ``RunStateError``; ``kind`` says which without parsing text:

============  ==============================================================
``connect``   the VMM's socket cannot be reached (not there, refused)
``timeout``   no complete answer before the deadline
``refused``   the VMM answered with an error (its message is kept)
``protocol``  the answer is not what the protocol says (or contradicts the request)
============  ==============================================================
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vfiod.errors import VfiodError

RUNSTATE_ERROR_KINDS = ("connect", "timeout", "refused", "protocol")


class RunStateError(VfiodError):
    """A run-state request failed; ``kind`` is one of ``RUNSTATE_ERROR_KINDS``."""

    def __init__(self, kind: str, message: str) -> None:
        assert kind in RUNSTATE_ERROR_KINDS, kind
        self.kind = kind
        super().__init__(message)


@dataclass(frozen=True)
class RunStatus:
    """What the VMM says about its vCPUs: ``running`` and its own name of the state
    (QMP's ``status``: ``running``, ``paused``, ``prelaunch``, ``finish-migrate`` ...);
    ``events``: asynchronous events seen while the request ran (QMP ``STOP``,
    ``RESUME``), for the log."""

    running: bool
    state: str
    events: tuple[str, ...] = ()


@runtime_checkable
class RunStateBackend(Protocol):
    """One VMM's run state. Every call blocks until acknowledged or ``deadline``."""

    def pause(self, deadline: float) -> RunStatus:
        """Stop the vCPUs; returns once the VMM says they are stopped."""
        ...

    def resume(self, deadline: float) -> RunStatus:
        """Start the vCPUs; returns once the VMM says they run."""
        ...

    def status(self, deadline: float) -> RunStatus:
        """The VMM's current run state."""
        ...


def time_left(deadline: float, what: str) -> float:
    """Seconds until ``deadline``; ``RunStateError("timeout")`` naming ``what`` if none."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise RunStateError("timeout", f"{what}: no answer before the deadline")
    return left


def expect_state(st: RunStatus, running: bool, what: str) -> RunStatus:
    """``st`` if it is the state ``what`` asked for, else a ``protocol`` error."""
    if st.running != running:
        want = "running" if running else "stopped"
        raise RunStateError("protocol", f"{what}: acknowledged, but the VMM says its vCPUs "
                            f"are {st.state!r}, not {want}")
    return st
