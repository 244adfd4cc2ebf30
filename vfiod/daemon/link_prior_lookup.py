"""The bandwidth prior looked up in a short-lived child process, so that the daemon never
imports pyroute2 (docs/architecture.md §4; docs/benchmarks.md §2). Spawning and reaping
processes is the daemon's part (the wiring root); the migration's planning gets only a
function answering the latest prior.

``LinkPriorLookup(destination).start()`` returns at once; a thread of its own starts the
child (``python -m vfiod.migration.planning.linkprior_probe DESTINATION``, this
interpreter, this package first on its path) and waits for its answer. Spawning Python
and importing pyroute2 takes a few hundred milliseconds: the migration does not wait for
it. ``current()`` answers at any time: the child's ``LinkPrior`` once it has arrived;
before that an "unknown" prior whose note says the lookup is still running, so the
predictor uses its default until then (``BandwidthEstimator`` asks again whenever it
needs the prior, and after the first 2 ms of sending it has a measured rate anyway).

The prior is advisory: whatever goes wrong ends in an "unknown" prior whose note names
it, and the migration goes on: the executable cannot be started, the child exits non-zero
or is killed by a signal (its last stderr line is quoted), its output is not a
``LinkPrior`` for this destination, or it gives no answer within ``timeout_s`` (then it
is killed). Every child is reaped and its pipes closed, by the thread, after its answer
or the kill; ``close()`` (the migration's end) kills one that still runs and waits for
the thread. The final answer is logged (``vfiod.linkprior``, info).

The daemon shares one lookup between the migrations to a destination, and keeps a child's
answer for a while (``link_priors.py``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from vfiod.migration.planning.linkprior import LinkPrior, prior_from_json

log = logging.getLogger("vfiod.linkprior")

PROBE_MODULE = "vfiod.migration.planning.linkprior_probe"
#: the child takes 0.2-0.5 s on an idle host; ten times that on a loaded one is still
#: an answer, and a hung child costs a thread and a process no longer than this
LOOKUP_TIMEOUT_S = 5.0
#: how long ``close`` waits for the thread once the child was killed
CLOSE_WAIT_S = 5.0
#: the most of a child's output a note quotes
QUOTE_CHARS = 200
#: the directory holding the ``vfiod`` package this process runs
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def probe_command() -> list[str]:
    """The child's command line before the destination: this interpreter, the probe.
    ``-P``: ``-m`` would put the daemon's working directory first on the module path,
    and a ``vfiod/`` there would run instead of this package (``_child_env``)."""
    return [sys.executable, "-P", "-m", PROBE_MODULE]


def _child_env() -> dict[str, str]:
    """This environment, with this package first on the path: the child runs the same
    code as the daemon, however the daemon found it."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ,
            "PYTHONPATH": PACKAGE_ROOT + (os.pathsep + path if path else "")}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _quote(data: bytes) -> str:
    text = data.decode(errors="replace").strip()
    return repr(text[:QUOTE_CHARS] + ("..." if len(text) > QUOTE_CHARS else ""))


class LinkPriorLookup:
    """One destination's prior, looked up by a child process (see the module)."""

    def __init__(self, destination: str, *, command: Sequence[str] | None = None,
                 timeout_s: float = LOOKUP_TIMEOUT_S,
                 on_answer: Callable[[LinkPrior, bool], None] | None = None) -> None:
        """``command``: the child's command line before the destination (tests run other
        children; default ``probe_command()``); ``on_answer``: told the final answer on
        the lookup's thread, and whether it is the child's own (``link_priors.py`` keeps
        those)."""
        self.destination = destination
        self._on_answer = on_answer
        self._argv = [*(probe_command() if command is None else command), destination]
        self._timeout_s = timeout_s
        self._lock = threading.Lock()          # _proc and _closed
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._answer: LinkPrior | None = None
        self._child_answer: LinkPrior | None = None   # the child's own, once it gave one
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"vfiod-link-prior {destination}")

    def start(self) -> LinkPriorLookup:
        self._thread.start()
        return self

    @property
    def answered(self) -> bool:
        """Whether ``current()`` is the final answer (the child's, or why there is none)."""
        return self._answer is not None

    @property
    def pid(self) -> int | None:
        """The child's process id once it was started (tests check it was reaped)."""
        return None if self._proc is None else self._proc.pid

    def current(self) -> LinkPrior:
        """The prior now: the answer, or "unknown" while the lookup is still running."""
        answer = self._answer
        if answer is not None:
            return answer
        return self._unknown(f"the route lookup for {self.destination} is still running "
                             "(a child process)")

    def close(self) -> None:
        """Kill the child if it still runs, and wait (bounded) until it was reaped."""
        with self._lock:
            self._closed = True
            if self._proc is not None:
                self._proc.kill()      # a no-op once it has exited
        if self._thread.is_alive():
            self._thread.join(CLOSE_WAIT_S)

    def _unknown(self, note: str) -> LinkPrior:
        return LinkPrior(self.destination, None, None, None, note)

    def _run(self) -> None:
        answer = self._lookup()
        own = answer is self._child_answer
        log.info("link prior for %s: %s", self.destination, answer.note)
        self._answer = answer
        if self._on_answer is not None:
            self._on_answer(answer, own)

    def _lookup(self) -> LinkPrior:
        with self._lock:
            if self._closed:
                return self._unknown("the migration ended before the route lookup started")
            try:
                proc = self._proc = subprocess.Popen(
                    self._argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, env=_child_env())
            except OSError as e:
                return self._unknown(f"cannot start the route lookup's child process "
                                     f"({self._argv[0]}): {e}")
        with proc:     # closes the pipes and reaps the child, however this ends
            try:
                out, err = proc.communicate(timeout=self._timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                return self._unknown(f"the route lookup's child process gave no answer "
                                     f"within {self._timeout_s:g} s and was killed")
        if self._closed:
            return self._unknown("the migration ended before the route lookup answered")
        return self._answer_of(proc.returncode, out, err)

    def _answer_of(self, status: int, out: bytes, err: bytes) -> LinkPrior:
        last_err = _quote(err.strip().splitlines()[-1] if err.strip() else b"")
        if status < 0:
            return self._unknown(f"the route lookup's child process was killed by "
                                 f"{_signal_name(-status)} (stderr: {last_err})")
        if status != 0:
            return self._unknown(f"the route lookup's child process failed with exit "
                                 f"status {status} (stderr: {last_err})")
        try:
            prior = prior_from_json(out.decode(errors="replace").strip())
        except ValueError as e:
            return self._unknown(f"the route lookup's child process answered {_quote(out)}: "
                                 f"{e}")
        if prior.destination != self.destination:
            return self._unknown(f"the route lookup's child process answered for "
                                 f"{prior.destination!r}, not {self.destination!r}")
        self._child_answer = prior
        return prior
