"""``QemuMigration``: QEMU's own migration, driven over QMP beside vfiod's
(docs/architecture.md §8.3; the session's contract: ``vfiod/migration/session/
vmm_half.py``).

Source: ``migrate-set-capabilities`` ``pause-before-switchover``, then ``migrate`` to the
destination QEMU's ``-incoming`` address; ``query-migrate`` is polled for the
``pre-switchover`` status (QEMU stopped the vCPUs and waits); ``migrate-continue
state=pre-switchover`` lets it finish; ``migrate_cancel`` abandons it. Destination:
``query-migrate`` is polled until the incoming migration completed.

Polled, not event-driven: vfiod holds its ``-qmp`` socket only for one conversation at a
time (one client per socket, §8.4), and the run-state backend uses the same socket, so
events sent while nobody is connected would be lost anyway. Each poll costs one short
conversation (about a millisecond). ``query-migrate`` can say ``completed`` before
``downtime`` and ``total-time`` are filled in (§8.4): ``completed`` waits for them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from vfiod.daemon.config_qemu import QemuConfig, incoming_uri
from vfiod.daemon.runstate.contract import RunStateError
from vfiod.daemon.runstate.qmp_connection import QmpConnection
from vfiod.migration.session.vmm_half import VmmProgress

#: seconds between two ``query-migrate`` polls while waiting for a status
POLL_S = 0.005
#: statuses after which QEMU's migration will not change any more
ENDED = frozenset({"completed", "failed", "cancelled"})


def progress_of(answer: Any) -> VmmProgress:
    """A ``VmmProgress`` from QEMU's ``query-migrate`` answer (``none`` when empty)."""
    if not isinstance(answer, dict):
        raise RunStateError("protocol", f"query-migrate answered {str(answer)[:200]}")
    ram_answer = answer.get("ram")
    ram: dict[str, Any] = ram_answer if isinstance(ram_answer, dict) else {}

    def ms(key: str) -> float | None:
        v = answer.get(key)
        return v / 1000.0 if isinstance(v, int | float) else None
    return VmmProgress(
        status=str(answer.get("status", "none")),
        remaining_bytes=int(ram.get("remaining", 0) or 0),
        transferred_bytes=int(ram.get("transferred", 0) or 0),
        expected_downtime_s=ms("expected-downtime"), downtime_s=ms("downtime"),
        total_s=ms("total-time"), error=str(answer.get("error-desc", "")),
        bandwidth_bps=(float(ram["mbps"]) * 1e6 / 8 if isinstance(ram.get("mbps"), int | float)
                       and ram["mbps"] > 0 else None))


class QemuMigration:
    """QEMU at the QMP socket ``qmp``; ``peer_host``: the host a source migrates to;
    ``incoming``: this QEMU's ``-incoming`` address when it is a destination; every
    wait is bounded by ``timeout_s``."""

    def __init__(self, qmp: str, *, timeout_s: float, peer_host: str = "",
                 incoming: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.qmp = qmp
        self.timeout_s = timeout_s
        self.peer_host = peer_host
        self.incoming = incoming
        self.clock = clock
        self._idle = threading.Event()     # never set: a bounded pause between polls

    def _run(self, *commands: tuple[str, dict[str, Any] | None]) -> Any:
        answer: Any = None
        with QmpConnection(self.qmp, self.clock() + self.timeout_s) as q:
            for command, arguments in commands:
                answer = q.execute(command, arguments)
        return answer

    # -- source -----------------------------------------------------------------------
    def start(self, incoming: str) -> None:
        if not incoming:
            raise RunStateError("protocol", "the destination's vfiod names no QEMU address "
                                "to migrate to: give its guest [guest.qemu] incoming")
        try:
            uri = incoming_uri(incoming, self.peer_host)
        except ValueError as e:
            raise RunStateError("protocol", str(e)) from None
        caps = [{"capability": "pause-before-switchover", "state": True}]
        self._run(("migrate-set-capabilities", {"capabilities": caps}),
                  ("migrate", {"uri": uri}))

    def progress(self) -> VmmProgress:
        return progress_of(self._run(("query-migrate", None)))

    def continue_switchover(self) -> None:
        self._run(("migrate-continue", {"state": "pre-switchover"}))

    def completed(self) -> VmmProgress:
        return self._wait(lambda p: p.status in ENDED and (
            p.status != "completed" or (p.downtime_s is not None and p.total_s is not None)),
            "its migration to complete")

    def abandon(self) -> VmmProgress:
        p = self.progress()
        if not p.migrating:
            return p
        self._run(("migrate_cancel", None))
        return self._wait(lambda q: not q.migrating, "its migration to end after a cancel")

    # -- destination ------------------------------------------------------------------
    def await_incoming(self) -> VmmProgress:
        p = self._wait(lambda q: q.status in ENDED, "its incoming migration to complete")
        if p.status != "completed":
            raise RunStateError("refused", f"QMP {self.qmp}: QEMU's incoming migration "
                                f"{p.status}" + (f": {p.error}" if p.error else ""))
        return p

    def _wait(self, done: Callable[[VmmProgress], bool], what: str) -> VmmProgress:
        end = self.clock() + self.timeout_s
        while True:
            p = self.progress()
            if done(p):
                return p
            if self.clock() >= end:
                raise RunStateError("timeout", f"QMP {self.qmp}: QEMU did not bring "
                                    f"{what} within {self.timeout_s:g} s (it says "
                                    f"{p.status})")
            self._idle.wait(POLL_S)


def qemu_half(q: QemuConfig | None, peer_host: str = "") -> QemuMigration | None:
    """QEMU's half of a guest's migration when its configuration names its QEMU: a
    source (``peer_host``: where it migrates to) or a destination, which needs the
    address its QEMU listens at (without one the source refuses, naming it)."""
    if q is None or not peer_host and q.incoming is None:
        return None
    return QemuMigration(q.qmp, timeout_s=q.timeout_s, peer_host=peer_host,
                         incoming=q.incoming or "")
