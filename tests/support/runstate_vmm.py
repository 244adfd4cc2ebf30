"""VMMs for the run-state backends' tests (docs/runstate-protocol.md,
docs/architecture.md §8.2).

``LineVmm`` is a VMM speaking the line protocol on a Unix socket, on a thread: it keeps
a ``running`` flag, answers ``pause``/``resume``/``status``, and records every request
it got. ``behaviour`` makes it misbehave: ``"silent"`` reads requests and never answers
(their connections stay open until it is closed), ``"refuse"`` answers every request with an error, ``"lie"`` says it
still runs after a pause, ``"wrong-id"`` echoes another id.

``QemuQmp`` is a real ``qemu-system-x86_64 -machine none -S`` with a QMP socket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

from tests.support.daemons import wait_until


class LineVmm:
    def __init__(self, path: Path, behaviour: str = "good", running: bool = True) -> None:
        self.path = str(path)
        self.behaviour = behaviour
        self.running = running
        self.requests: list[dict[str, Any]] = []
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            with conn.makefile("rwb") as f:
                line = f.readline()
                if not line:
                    continue
                req = json.loads(line)
                self.requests.append(req)
                if self.behaviour == "silent":
                    continue             # kept open, never answered, until close()
                f.write(json.dumps(self._answer(req)).encode() + b"\n")
                f.flush()
            conn.close()

    def _answer(self, req: dict[str, Any]) -> dict[str, Any]:
        head = {"runstate": req["runstate"], "id": req["id"]}
        if self.behaviour == "wrong-id":
            head["id"] = req["id"] + 100
        if self.behaviour == "refuse":
            return {**head, "ok": False, "error": "vCPUs are being reset"}
        if req["op"] == "pause":
            self.running = self.behaviour == "lie"
        elif req["op"] == "resume":
            self.running = True
        return {**head, "ok": True, "running": self.running,
                "state": "running" if self.running else "paused"}

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)


class QemuQmp:
    """A real QEMU with no machine, stopped (``-S``), its QMP socket at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        qemu = shutil.which("qemu-system-x86_64")
        assert qemu is not None, "qemu-system-x86_64 is missing: .ci/deps ensure"
        self.proc = subprocess.Popen(
            [qemu, "-machine", "none", "-nodefaults", "-display", "none",
             "-qmp", f"unix:{self.path},server=on,wait=off", "-S"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: os.path.exists(self.path) or self.proc.poll() is not None,
                   30, "QEMU's QMP socket")
        assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""

    def freeze(self) -> None:
        """SIGSTOP QEMU and return once every thread of it is stopped: ``kill`` returns
        before a thread running on another CPU has taken the signal, and a QEMU that
        still runs for those moments can greet the next client and take its commands."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        wait_until(self._all_threads_stopped, 30, f"QEMU {self.proc.pid} to stop")

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def _all_threads_stopped(self) -> bool:
        tasks = Path(f"/proc/{self.proc.pid}/task")
        states = []
        for t in tasks.iterdir():
            try:
                stat = (t / "stat").read_text()
            except FileNotFoundError:      # a thread that exited meanwhile
                continue
            states.append(stat.rsplit(")", 1)[1].split()[0])
        return bool(states) and all(s in ("T", "t") for s in states)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
