"""The processes ``vfiod demo`` starts, each through the real command line: two
``vfiod run`` daemons and the ``vfiod ctl`` commands an operator types
(docs/architecture.md §6). Every wait has a deadline, every failure names its step
(``DemoStepError``), and ``stop`` never leaves a daemon behind: SIGTERM first (the clean
stop, which cancels a migration that has not committed), SIGKILL if it outlasts its
deadline.

Each child runs in its own session, so a Ctrl-C at the terminal reaches the demo alone,
which then stops its daemons itself. Children import the same ``vfiod`` as this process
(its directory leads their ``PYTHONPATH``) and never see a ``NOTIFY_SOCKET`` meant for it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import vfiod
from vfiod.api import ClientError, ControlClient
from vfiod.cli.demo_setup import GUEST, DemoHostFiles

#: a cold start compiles the numba kernels first (about 30 s on a small machine)
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
#: how often the demo asks a starting daemon whether it is ready
READY_POLL_S = 0.1
#: lines of a daemon's log a failure message quotes
LOG_TAIL_LINES = 12


class DemoStepError(Exception):
    """A step of the demo failed; ``step`` names it for the message."""

    def __init__(self, step: str, message: str) -> None:
        self.step = step
        self.message = message
        super().__init__(f"{step}: {message}")


def vfiod_argv(*args: str) -> list[str]:
    """``vfiod ARGS`` as this interpreter runs it (the same entry point as the script).
    ``-P``: ``-m`` would put the working directory first on the module path, and a
    ``vfiod/`` there (another version's checkout) would run instead of this code, which
    ``child_env`` puts first on ``PYTHONPATH``."""
    return [sys.executable, "-P", "-m", "vfiod.cli.main", *args]


def shown(argv: list[str]) -> str:
    """A command line as an operator types it: ``vfiod ...``."""
    return " ".join(["vfiod", *argv[argv.index("vfiod.cli.main") + 1:]])


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    here = str(Path(vfiod.__file__).resolve().parents[1])
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                else "")
    return env


class DemoDaemon:
    """One ``vfiod run --backend sim`` process, its configuration in ``files``."""

    def __init__(self, files: DemoHostFiles, backend: str = "sim") -> None:
        self.files = files
        self.step = f"start the {files.role} daemon"
        self.argv = vfiod_argv("run", "--backend", backend, "--config", str(files.config),
                               "--sim-root", str(files.sim_root))
        self.proc: subprocess.Popen[bytes] | None = None
        #: the daemon section of its ``status`` once ready (pid, metrics, migration_listen)
        self.info: dict[str, Any] = {}
        self.ready_s: float | None = None
        self.exit: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        with open(self.files.log, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=child_env(),
                                         start_new_session=True)
        self._started = time.monotonic()

    def wait_ready(self, want_state: str, timeout: float = READY_TIMEOUT_S) -> None:
        """Until its control socket answers ``status`` with the metrics endpoint up and
        guest ``vm1`` in ``want_state``; ``DemoStepError`` if it exits or the deadline
        passes first."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        seen = "its control socket does not answer yet"
        while True:
            answer = self._status()
            if isinstance(answer, str):
                seen = answer
            else:
                info, guests = answer
                state = next((g["state"] for g in guests if g["name"] == GUEST), None)
                if info.get("metrics") and info.get("migration_listen") and state == want_state:
                    self.info = info
                    self.ready_s = time.monotonic() - self._started
                    return
                seen = f"guest {GUEST} is {state}, not yet {want_state}"
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoStepError(self.step, f"not ready after {timeout:g} s ({seen})"
                                    + self.log_tail())
            try:        # the poll interval, cut short if the daemon exits
                self.exit = self.proc.wait(min(left, READY_POLL_S))
            except subprocess.TimeoutExpired:
                continue
            raise DemoStepError(self.step, f"vfiod run exited with status {self.exit} "
                                f"before it was ready: {self.last_error()}" + self.log_tail())

    def _status(self) -> tuple[dict[str, Any], list[dict[str, Any]]] | str:
        try:
            with ControlClient(str(self.files.control_socket), timeout=10) as c:
                r = c.call("status", {})
        except (ClientError, OSError) as e:
            return f"control socket: {e}"
        return r["daemon"], r["guests"]

    def status(self, step: str) -> dict[str, Any]:
        """Its ``status`` of the guest through the control socket (the call ``ctl``
        makes); ``DemoStepError`` naming ``step`` if it does not answer."""
        try:
            with ControlClient(str(self.files.control_socket), timeout=10) as c:
                return c.call("status", {"guest": GUEST})
        except (ClientError, OSError) as e:
            raise DemoStepError(step, f"the {self.files.role} daemon's control socket: {e}"
                                + self.log_tail()) from None

    def ctl(self, *args: str, step: str, timeout: float = 60.0) -> dict[str, Any]:
        """``vfiod ctl --socket SOCKET ARGS --json`` as a process: its one JSON answer."""
        argv = vfiod_argv("ctl", "--socket", str(self.files.control_socket), *args, "--json")
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                               env=child_env(), stdin=subprocess.DEVNULL,
                               start_new_session=True)
        except subprocess.TimeoutExpired:
            raise DemoStepError(step, f"{shown(argv)} did not answer in {timeout:g} s") from None
        if p.returncode != 0:
            raise DemoStepError(step, f"{shown(argv)} exited with status {p.returncode}: "
                                f"{(p.stdout + p.stderr).strip()[-1000:]}")
        return dict(json.loads(p.stdout))

    def last_error(self) -> str:
        """The last ERROR line of its log, without timestamp and logger."""
        try:
            lines = self.files.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [ln.split(" ERROR ", 1)[1] for ln in lines if " ERROR " in ln]
        return errors[-1].split(": ", 1)[-1] if errors else "(no error in its log)"

    def log_tail(self) -> str:
        try:
            lines = self.files.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        lines = [ln for ln in lines if ln.strip()][-LOG_TAIL_LINES:]
        return (f"\n  last lines of the {self.files.role} daemon's log:\n    "
                + "\n    ".join(lines)) if lines else ""

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> str:
        """Stop it (SIGTERM, then SIGKILL after ``timeout``); what happened, in words.
        Safe to call at any point, and more than once."""
        if self.proc is None:
            return "never started"
        if self.proc.poll() is not None:
            self.exit = self.proc.returncode
            return f"had exited with status {self.exit}"
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.exit = self.proc.wait()
            return f"ignored SIGTERM for {timeout:g} s: killed"
        return f"stopped by SIGTERM, exit status {self.exit}"


def kill_quietly(proc: subprocess.Popen[Any] | None, stream: IO[Any] | None = None) -> None:
    """End a helper process the demo started (a ``vfiod ctl`` still following)."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    if stream is not None:
        stream.close()
