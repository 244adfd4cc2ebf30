"""How the daemon stops (docs/architecture.md §6): signals reach the main loop through a
self-pipe, and a stop fits in the unit's ``TimeoutStopSec``.

A Python signal handler runs on the main thread between two bytecodes of whatever that
thread was doing, possibly while it holds a lock: a handler that takes a lock
(``Event.set`` does, through its ``Condition``) deadlocks when it interrupts the holder,
and one that logs re-enters the logging module's locks. ``SignalPipe.handler`` therefore
only writes the signal's number into a non-blocking pipe; the main loop waits on that
pipe and does the work (``main.py``: SIGTERM and SIGINT stop, SIGHUP reloads). A signal
that comes while the daemon is already stopping changes nothing: the stop is already
cancelling and rolling back what has not committed, and cutting that short would leave
devices in the middle of a migration. ``close`` sets the signals to "ignore" at the end,
so a late SIGTERM cannot turn a clean exit into a death by signal.

The budget: a stop cancels every migration that has not committed and waits at most
``STOP_BUDGET_S`` for the migration threads (a source rolls back: its devices RUNNING, the
guest resumed; a destination discards). ``STOP_MARGIN_S`` covers the rest of the stop
(closing the guests' fds, the listeners, the simulated host). Together they stay well
under the unit's ``TimeoutStopSec`` (tests/daemon/test_stop_budget.py reads the unit), so
systemd's SIGKILL is never how a rollback ends. A thread still running at the end of the
budget keeps its guest: its fds are left for the process exit to close (the kernel resets
the devices then) rather than closed under a driver call.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Iterable
from types import FrameType
from typing import Any

#: How long a stop waits for the migrations it cancelled to end (roll back, or finish
#: when past their commit); the unit's TimeoutStopSec is 60 s.
STOP_BUDGET_S = 20.0
#: What the rest of a stop may take after that budget (closing fds, listeners).
STOP_MARGIN_S = 10.0

#: The signals the daemon acts on.
DAEMON_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: The signals that stop it.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


class SignalPipe:
    """A self-pipe: ``handler`` writes each signal's number, ``wait``/``drain`` read them
    on the main loop. ``install`` and ``close`` run on the main thread."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous: dict[int, Any] = {}

    def install(self, signals: Iterable[int] = DAEMON_SIGNALS) -> None:
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self.handler)

    def handler(self, signum: int, frame: FrameType | None) -> None:
        # One write and nothing else (see the module docstring). A full pipe drops this
        # byte: the main loop has 64 KiB of signals to wake on already.
        try:
            os.write(self._write, bytes((signum,)))
        except OSError:
            pass

    def wait(self, timeout_s: float) -> list[int]:
        """The signals that came, in order, once one is there or ``timeout_s`` passed."""
        ready, _, _ = select.select([self._read], [], [], max(0.0, timeout_s))
        return self.drain() if ready else []

    def drain(self) -> list[int]:
        """The signals written so far, without waiting."""
        got = bytearray()
        while True:
            try:
                chunk = os.read(self._read, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            got += chunk
        return list(got)

    def close(self, restore: bool = False) -> None:
        """Set the installed signals to "ignore" (``restore``: back to what they were),
        then close the pipe."""
        for sig, previous in self._previous.items():
            if not restore:
                previous = signal.SIG_IGN
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        if self._read >= 0:
            os.close(self._read)
            os.close(self._write)
            self._read = self._write = -1
