"""Signal handlers only write the signal's number to a self-pipe; the main loop does the
work (daemon/stopping.py, docs/architecture.md §6). A handler runs on the main thread
between two bytecodes of whatever it interrupted: one that takes a lock (``Event.set``
does, through its ``Condition``) deadlocks when it interrupts the holder of that lock, and
one that logs re-enters the logging module's locks."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from vfiod.daemon.stopping import SignalPipe


def calls_made_by(fn: Callable[..., Any], *args: Any) -> list[str]:
    """Every function ``fn`` calls, Python or C (the profiler's view), as module.name."""
    seen: list[str] = []
    own = getattr(fn, "__func__", fn).__code__

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is not own:
            seen.append(f"{frame.f_globals.get('__name__')}.{frame.f_code.co_name}")
        elif event == "c_call" and arg is not sys.setprofile:
            seen.append(f"{getattr(arg, '__module__', None)}.{arg.__name__}")
    sys.setprofile(profile)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    return seen


def test_the_handler_only_writes_to_its_pipe() -> None:
    pipe = SignalPipe()
    try:
        assert calls_made_by(pipe.handler, signal.SIGTERM, None) == ["posix.write"]
        assert pipe.drain() == [signal.SIGTERM]
    finally:
        pipe.close()


def test_the_main_loop_reads_them_in_order() -> None:
    pipe = SignalPipe()
    try:
        assert pipe.wait(0) == []
        pipe.handler(signal.SIGHUP, None)
        pipe.handler(signal.SIGTERM, None)
        assert pipe.wait(5) == [signal.SIGHUP, signal.SIGTERM]
        assert pipe.drain() == []
    finally:
        pipe.close()


def test_a_full_pipe_drops_a_signal_instead_of_blocking() -> None:
    # A main loop that does not read for 64 Ki signals has enough to wake on; the handler
    # must never block the main thread it interrupted.
    pipe = SignalPipe()
    try:
        for _ in range(70_000):
            pipe.handler(signal.SIGHUP, None)
        got = pipe.drain()
        assert 4096 <= len(got) < 70_000 and set(got) == {signal.SIGHUP}
    finally:
        pipe.close()


def test_a_real_signal_wakes_the_waiting_main_thread() -> None:
    # SIGUSR1 stands in for SIGTERM: the test process keeps its own SIGTERM and SIGINT.
    pipe = SignalPipe()
    before = signal.getsignal(signal.SIGUSR1)
    pipe.install((signal.SIGUSR1,))
    try:
        assert signal.getsignal(signal.SIGUSR1) == pipe.handler
        os.kill(os.getpid(), signal.SIGUSR1)
        assert pipe.wait(10) == [signal.SIGUSR1]
    finally:
        pipe.close(restore=True)
    assert signal.getsignal(signal.SIGUSR1) == before


def test_after_the_stop_a_late_signal_is_ignored() -> None:
    # On its way out the process must not die of a second SIGTERM: exit 0 stays exit 0.
    pipe = SignalPipe()
    before = signal.getsignal(signal.SIGUSR2)
    pipe.install((signal.SIGUSR2,))
    try:
        pipe.close()
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR2)          # would end the test run otherwise
    finally:
        signal.signal(signal.SIGUSR2, before)
