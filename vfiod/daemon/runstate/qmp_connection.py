"""One short QMP conversation with QEMU: connect, greeting, ``qmp_capabilities``, the
caller's commands, disconnect (docs/architecture.md §8.2, §8.4).

Shared by the run-state backend (``stop``, ``cont``, ``query-status``) and the
coordinated switchover (``migrate``, ``query-migrate``, ``migrate-continue``, §8.3).
Both hold vfiod's own ``-qmp`` socket only for one conversation, because QEMU serves one
client per socket: a socket that accepts but sends no greeting before the deadline is
reported as probably held by another client. Events that arrive during the conversation
are kept in ``events`` (their names, in order).

A client's first line can be an answer to a command of an earlier client that gave up
(seen after a pause timed out against a wedged QEMU, docs/architecture.md §8.4), ahead
of the greeting: such answers (an ``id`` with ``return`` or ``error``) are skipped while
the greeting is awaited; anything else first is a protocol error.
"""

from __future__ import annotations

import itertools
from typing import Any

from vfiod.daemon.runstate.channel import VmmChannel
from vfiod.daemon.runstate.contract import RunStateError


class QmpConnection:
    """A negotiated QMP connection to ``path``; use as a context manager."""

    _ids = itertools.count(1)

    def __init__(self, path: str, deadline: float) -> None:
        self.what = f"QMP {path}"
        self.deadline = deadline
        self.events: list[str] = []
        self._chan = VmmChannel(path, self.what, deadline)
        try:
            greeting = self._greeting()
            if "QMP" not in greeting:
                raise RunStateError("protocol", f"{self.what}: not a QMP greeting: "
                                    f"{str(greeting)[:200]}")
            self.execute("qmp_capabilities")
        except BaseException:
            self._chan.close()
            raise

    def __enter__(self) -> QmpConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self._chan.close()

    def _greeting(self) -> dict[str, Any]:
        try:
            while True:
                msg = self._chan.receive(self.deadline, "the QMP greeting")
                if not _stale_answer(msg):
                    return msg
        except RunStateError as e:
            if e.kind != "timeout":
                raise
            raise RunStateError("timeout", f"{self.what}: no QMP greeting before the "
                                "deadline: QEMU serves one client per QMP socket, so another "
                                "client probably holds this one; give vfiod its own -qmp "
                                "socket") from None

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """QEMU's ``return`` for ``command``; ``RunStateError("refused")`` with QEMU's
        error class and text when it answers with an error."""
        rid = next(self._ids)
        msg_out: dict[str, Any] = {"execute": command, "id": rid}
        if arguments:
            msg_out["arguments"] = arguments
        self._chan.send(msg_out, self.deadline)
        while True:
            msg = self._chan.receive(self.deadline, f"the answer to {command}")
            if "event" in msg:
                self.events.append(str(msg["event"]))
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


def _stale_answer(msg: dict[str, Any]) -> bool:
    """An answer left over from an earlier client of the monitor (see the module text)."""
    return "id" in msg and ("return" in msg or "error" in msg) and "QMP" not in msg
