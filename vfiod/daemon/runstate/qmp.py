"""``QmpRunState``: QEMU's run state through QMP (docs/architecture.md §8.2).

``pause`` sends ``stop``, ``resume`` sends ``cont``; each is acknowledged by QEMU's
answer and then read back with ``query-status`` (its ``running`` flag decides, its
``status`` is kept for the log). The ``STOP`` and ``RESUME`` events QEMU sends while a
command runs are collected in the returned ``RunStatus``.

One client per QMP socket: QEMU 7.2 serves one client at a time on a ``-qmp`` socket
and a second one gets no greeting until the first leaves (docs/architecture.md §8.4).
vfiod therefore gives QEMU its own socket (``-qmp unix:PATH,server=on,wait=off``, next
to the operator's), connects for each request and disconnects after it, so it never
holds the socket between requests. A socket that accepts but sends no greeting before
the deadline is reported as held by another client.
"""

from __future__ import annotations

import itertools
from typing import Any

from vfiod.daemon.runstate.channel import VmmChannel
from vfiod.daemon.runstate.contract import RunStateError, RunStatus, expect_state


class QmpRunState:
    """A QEMU reached through the QMP socket at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.what = f"QMP {path}"
        self._ids = itertools.count(1)

    def pause(self, deadline: float) -> RunStatus:
        return expect_state(self._run("stop", deadline), False, f"{self.what}: stop")

    def resume(self, deadline: float) -> RunStatus:
        return expect_state(self._run("cont", deadline), True, f"{self.what}: cont")

    def status(self, deadline: float) -> RunStatus:
        return self._run(None, deadline)

    def _run(self, command: str | None, deadline: float) -> RunStatus:
        """Connect, negotiate, run ``command`` (if any), read the status back."""
        chan = VmmChannel(self.path, self.what, deadline)
        events: list[str] = []
        try:
            greeting = self._greeting(chan, deadline)
            if "QMP" not in greeting:
                raise RunStateError("protocol", f"{self.what}: not a QMP greeting: "
                                    f"{str(greeting)[:200]}")
            self._execute(chan, "qmp_capabilities", deadline, events)
            if command is not None:
                self._execute(chan, command, deadline, events)
            answer = self._execute(chan, "query-status", deadline, events)
        finally:
            chan.close()
        if not isinstance(answer, dict) or not isinstance(answer.get("running"), bool):
            raise RunStateError("protocol", f"{self.what}: query-status answered "
                                f"{str(answer)[:200]}")
        return RunStatus(answer["running"], str(answer.get("status", "")), tuple(events))

    def _greeting(self, chan: VmmChannel, deadline: float) -> dict[str, Any]:
        try:
            return chan.receive(deadline, "the QMP greeting")
        except RunStateError as e:
            if e.kind != "timeout":
                raise
            raise RunStateError("timeout", f"{self.what}: no QMP greeting before the "
                                "deadline: QEMU serves one client per QMP socket, so another "
                                "client probably holds this one; give vfiod its own -qmp "
                                "socket") from None

    def _execute(self, chan: VmmChannel, command: str, deadline: float,
                 events: list[str]) -> Any:
        rid = next(self._ids)
        chan.send({"execute": command, "id": rid}, deadline)
        while True:
            msg = chan.receive(deadline, f"the answer to {command}")
            if "event" in msg:
                events.append(str(msg["event"]))
                continue
            if msg.get("id") != rid:
                continue          # an answer to nothing vfiod asked on this connection
            if "error" in msg:
                err = msg["error"] if isinstance(msg["error"], dict) else {}
                raise RunStateError("refused", f"{self.what}: {command}: "
                                    f"{err.get('class', 'error')}: {err.get('desc', msg)}")
            if "return" not in msg:
                raise RunStateError("protocol", f"{self.what}: {command}: answer without "
                                    f"return or error: {str(msg)[:200]}")
            return msg["return"]
