"""``QmpRunState``: QEMU's run state through QMP (docs/architecture.md §8.2).

``pause`` sends ``stop``, ``resume`` sends ``cont``; each is acknowledged by QEMU's
answer and then read back with ``query-status`` (its ``running`` flag decides, its
``status`` is kept for the log). The ``STOP`` and ``RESUME`` events QEMU sends while a
command runs are collected in the returned ``RunStatus``.

Each request is one ``QmpConnection`` conversation, so vfiod never holds its ``-qmp``
socket between requests (QEMU serves one client per socket, docs/architecture.md §8.4).
"""

from __future__ import annotations

from typing import Any

from vfiod.daemon.runstate.contract import RunStateError, RunStatus, expect_state
from vfiod.daemon.runstate.qmp_connection import QmpConnection


class QmpRunState:
    """A QEMU reached through the QMP socket at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.what = f"QMP {path}"

    def pause(self, deadline: float) -> RunStatus:
        return expect_state(self._run("stop", deadline), False, f"{self.what}: stop")

    def resume(self, deadline: float) -> RunStatus:
        return expect_state(self._run("cont", deadline), True, f"{self.what}: cont")

    def status(self, deadline: float) -> RunStatus:
        return self._run(None, deadline)

    def _run(self, command: str | None, deadline: float) -> RunStatus:
        """Connect, negotiate, run ``command`` (if any), read the status back. A ``stop``
        of vCPUs that are already stopped is not sent: QEMU waiting before its own
        switchover (docs/architecture.md §8.3) answers it only after draining its block
        layer, tens of milliseconds of the downtime for nothing."""
        with QmpConnection(self.path, deadline) as qmp:
            answer = qmp.execute("query-status") if command == "stop" else None
            if answer is None or _running(answer):
                if command is not None:
                    qmp.execute(command)
                answer = qmp.execute("query-status")
            events = tuple(qmp.events)
        if not isinstance(answer, dict) or not isinstance(answer.get("running"), bool):
            raise RunStateError("protocol", f"{self.what}: query-status answered "
                                f"{str(answer)[:200]}")
        return RunStatus(answer["running"], str(answer.get("status", "")), events)


def _running(answer: Any) -> bool:
    return not isinstance(answer, dict) or answer.get("running") is not False
