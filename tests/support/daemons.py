"""Real ``vfiod run`` processes: ``DaemonProcess`` (``--backend sim``) for the daemon tier,
``LinuxDaemon`` (``--backend linux``) for the kernel tier's guest suite (docs/testing.md
"daemon", "The real-kernel tier").

``DaemonProcess`` starts the daemon as a subprocess with a config written to a temporary
directory, a control socket there, metrics on 127.0.0.1 port 0, and ``NOTIFY_SOCKET``
pointing at a real datagram socket the test owns. ``wait_for("READY=1")`` reads the
notify datagrams until one carries that line or the deadline passes (no sleeps).
``client()`` is a ``ControlClient`` on its socket; ``ctl(...)`` runs ``vfiod ctl`` as a
subprocess, the way an operator would.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vfiod.api import ControlClient

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0           # numba imports and the simulated host take a few seconds


def vfiod_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vfiod.cli.main", *args]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC",
                                                               "WATCHDOG_PID")}
    env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def wait_until(cond: Callable[[], Any], timeout: float, what: str | Callable[[], str],
               poll: Callable[[float], None] | None = None) -> Any:
    """Re-evaluate ``cond`` until it is truthy; between tries block in ``poll`` (which
    returns early when something happens) or on a short select on nothing. ``what``
    names what is awaited in the timeout's message; a callable is asked then (the
    daemons' logs as they are at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {said}")
        if poll is not None:
            poll(min(left, 0.2))
        else:
            select.select([], [], [], min(left, 0.05))


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket collecting messages."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def poll(self, timeout: float) -> None:
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        while ready:
            data = self.sock.recv(65536).decode()
            fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            self.messages.append(fields)
            ready, _, _ = select.select([self.sock], [], [], 0)

    def wait_for(self, key: str, value: str = "1", timeout: float = START_TIMEOUT,
                 after: int = 0, alive: Callable[[], None] | None = None) -> dict[str, str]:
        def found() -> dict[str, str] | None:
            if alive is not None:
                alive()
            return next((m for m in self.messages[after:] if m.get(key) == value), None)
        return wait_until(found, timeout, f"{key}={value} on NOTIFY_SOCKET", self.poll)

    def close(self) -> None:
        self.sock.close()


class DaemonProcess:
    def __init__(self, config: str, name: str = "vfiod", extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        # Not under pytest's tmp_path: the peer-credential test needs a directory another
        # uid can traverse.
        self.dir = Path(tempfile.mkdtemp(prefix=f"vfiod-{name}-"))
        os.chmod(self.dir, 0o755)
        self.socket = str(self.dir / "control.sock")
        self.config_path = self.dir / "vfiod.toml"
        if "[paths]" not in config:     # its own journal, not the host's /var/lib/vfiod
            config += f'\n[paths]\nstate = "{self.dir / "state"}"\n'
        self.config_path.write_text(config)
        self.notify = NotifySocket(self.dir)
        self.log_path = self.dir / "daemon.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = vfiod_cmd("run", "--backend", "sim", "--config", str(self.config_path),
                        "--control-socket", self.socket, "--metrics-listen", "127.0.0.1:0",
                        "--sim-root", str(self.dir / "host"), *extra_args)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=child_env(NOTIFY_SOCKET=self.notify.path, **(env or {})))
        self.ready: dict[str, str] = {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")

    def wait_ready(self) -> dict[str, str]:
        self.ready = self.notify.wait_for("READY", alive=self._alive)
        return self.ready

    def client(self) -> ControlClient:
        return ControlClient(self.socket, timeout=30)

    def call(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        with self.client() as c:
            return c.call(op, args)

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(vfiod_cmd("ctl", "--socket", self.socket, *args),
                              capture_output=True, text=True, timeout=timeout, env=child_env())

    @property
    def metrics_address(self) -> str:
        return str(self.call("status")["daemon"]["metrics"])

    @property
    def migration_address(self) -> str:
        return str(self.call("status")["daemon"]["migration_listen"])

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"daemon ignored SIGTERM for {timeout} s:\n{self.log()}"
                                     ) from None
        self._log.close()
        self.notify.poll(0)             # what it said on the way out (STOPPING=1)
        return int(self.proc.returncode)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._log.closed:
            self._log.close()
        if self.notify.sock.fileno() >= 0:
            self.notify.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class LinuxDaemon:
    """One ``vfiod run --backend linux`` process (the kernel tier's guest suite) with its
    config, control socket, notify socket and log in ``workdir/name`` (short paths: a Unix
    socket path has 107 bytes). Every wait is bounded by ``deadline_s``."""

    #: generous: under TCG a daemon takes ~10 s just to import numpy and numba
    deadline_s = 60.0

    def __init__(self, name: str, config: str, workdir: Path,
                 env: dict[str, str] | None = None) -> None:
        """``env``: set in the daemon's environment over ``child_env``'s."""
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir()
        self.socket = str(self.dir / "control.sock")
        if "[paths]" not in config:     # its own journal: two daemons share this host
            config += f'\n[paths]\nstate = "{self.dir / "state"}"\n'
        (self.dir / "vfiod.toml").write_text(config)
        self.notify = NotifySocket(self.dir)
        self.log_path = self.dir / "daemon.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                vfiod_cmd("run", "--backend", "linux", "--config", str(self.dir / "vfiod.toml"),
                          "--control-socket", self.socket, "--metrics-listen", ""),
                stdout=log, stderr=subprocess.STDOUT,
                env=child_env(NOTIFY_SOCKET=self.notify.path, PYTHONUNBUFFERED="1",
                              NUMBA_DEBUG_CACHE="1", **(env or {})))
        self.ready: dict[str, str] = {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def journal(self) -> str:
        """The log without numba's cache lines, for failure messages."""
        return "\n".join(ln for ln in self.log().splitlines() if not ln.startswith("[cache]"))

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon {self.name} exited with {self.proc.returncode}:\n"
                                 f"{self.journal()}")

    def wait_ready(self) -> None:
        self.ready = self.notify.wait_for("READY", timeout=self.deadline_s, alive=self._alive)

    def call(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        self._alive()
        with ControlClient(self.socket, timeout=self.deadline_s) as c:
            return c.call(op, args)

    def guest(self, name: str) -> dict[str, Any]:
        return dict(self.call("status", {"guest": name})["guests"][0])

    def ctl_argv(self, *args: str) -> list[str]:
        return vfiod_cmd("ctl", "--socket", self.socket, *args, "--json")

    def ctl(self, *args: str, expect: int = 0) -> Any:
        """``vfiod ctl ARGS --json`` as a process; its exit code must be ``expect``."""
        return self.ctl_many([list(args)], [expect])[0]

    def ctl_many(self, commands: list[list[str]], expect: list[int]) -> list[Any]:
        """Run several ``vfiod ctl ... --json`` at once (each pays seconds of Python
        start-up under TCG) and return what each printed last (``migrate`` prints one
        JSON object per progress update, the outcome last)."""
        procs = [subprocess.Popen(self.ctl_argv(*c), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=child_env())
                 for c in commands]
        outs = []
        for cmd, want, p in zip(commands, expect, procs, strict=True):
            try:
                out, err = p.communicate(timeout=self.deadline_s)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            assert p.returncode == want, (
                f"vfiod ctl {' '.join(cmd)} --json exited {p.returncode}, expected {want}\n"
                f"stdout:\n{out}\nstderr:\n{err}\n--- daemon {self.name} ---\n{self.journal()}")
            outs.append(json.loads(out) if out.startswith("{\n") else
                        json.loads(out.strip().splitlines()[-1]))
        return outs

    def terminate(self) -> int:
        """SIGTERM, then the exit status (bounded wait)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(self.deadline_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon {self.name} ignored SIGTERM for "
                                 f"{self.deadline_s:g} s:\n{self.journal()}") from None
        self.notify.poll(0)             # what it said on its way out (STOPPING=1)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()


def guest_status(d: DaemonProcess, guest: str) -> dict[str, Any]:
    r = d.call("status", {"guest": guest})
    return dict(r["guests"][0])


_STEP = re.compile(r"guest (\S+): ([a-z-]+) -> ([a-z-]+): ")


def lifecycle_steps(d: DaemonProcess, guest: str) -> list[tuple[str, str]]:
    """The guest's lifecycle transitions so far, from the daemon's log (each is logged)."""
    return [(m[2], m[3]) for m in map(_STEP.search, d.log().splitlines())
            if m is not None and m[1] == guest]


@contextmanager
def daemon_pair(src_config: str, dst_config: str, src_name: str, dst_name: str
                ) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    """A source and a destination daemon, both ready; both cleaned up afterwards."""
    src = DaemonProcess(src_config, src_name)
    dst = DaemonProcess(dst_config, dst_name)
    try:
        src.wait_ready()
        dst.wait_ready()
        yield src, dst
    finally:
        for d in (src, dst):
            d.cleanup()
