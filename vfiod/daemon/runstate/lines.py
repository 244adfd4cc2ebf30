"""``LineRunState``: the run-state line protocol for VMMs without QMP
(docs/runstate-protocol.md; docs/architecture.md §8.2).

vfiod connects to the VMM's Unix socket for each request, sends one JSON line
(``runstate``: the protocol version, ``id``, ``op``: ``pause`` | ``resume`` | ``status``,
``timeout_ms``: how long vfiod will wait) and reads one JSON line back, sent by the VMM
once its vCPUs are in the state asked for: ``ok``, ``running``, ``state`` (or ``ok``
false and ``error``). The answer must echo the version and the id.
"""

from __future__ import annotations

import itertools
import math
import time

from vfiod.daemon.runstate.channel import VmmChannel
from vfiod.daemon.runstate.contract import RunStateError, RunStatus, expect_state

#: The protocol version vfiod speaks (docs/runstate-protocol.md §1).
RUNSTATE_PROTOCOL_VERSION = 1
RUNSTATE_OPS = ("pause", "resume", "status")


class LineRunState:
    """A VMM speaking the line protocol on the Unix socket at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.what = f"run-state socket {path}"
        self._ids = itertools.count(1)

    def pause(self, deadline: float) -> RunStatus:
        return expect_state(self._request("pause", deadline), False, f"{self.what}: pause")

    def resume(self, deadline: float) -> RunStatus:
        return expect_state(self._request("resume", deadline), True, f"{self.what}: resume")

    def status(self, deadline: float) -> RunStatus:
        return self._request("status", deadline)

    def _request(self, op: str, deadline: float) -> RunStatus:
        rid = next(self._ids)
        chan = VmmChannel(self.path, self.what, deadline)
        try:
            timeout_ms = max(1, math.floor((deadline - time.monotonic()) * 1000))
            chan.send({"runstate": RUNSTATE_PROTOCOL_VERSION, "id": rid, "op": op,
                       "timeout_ms": timeout_ms}, deadline)
            answer = chan.receive(deadline, f"the acknowledgement of {op}")
        finally:
            chan.close()
        where = f"{self.what}: {op}"
        if answer.get("runstate") != RUNSTATE_PROTOCOL_VERSION or answer.get("id") != rid:
            raise RunStateError("protocol", f"{where}: the answer must echo runstate "
                                f"{RUNSTATE_PROTOCOL_VERSION} and id {rid}: "
                                f"{str(answer)[:200]}")
        if answer.get("ok") is False:
            raise RunStateError("refused", f"{where}: the VMM refused: "
                                f"{str(answer.get('error', 'no reason given'))[:500]}")
        running = answer.get("running")
        if answer.get("ok") is not True or not isinstance(running, bool):
            raise RunStateError("protocol", f"{where}: an answer needs ok true and running "
                                f"true or false: {str(answer)[:200]}")
        return RunStatus(running, str(answer.get("state", "running" if running else
                                                  "paused")))
