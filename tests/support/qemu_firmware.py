"""A real QEMU with nothing to boot, for the coordinated-switchover tests with daemons
(docs/architecture.md §8.3, §8.4): Debian's ``qemu-system-x86_64`` (TCG, q35) whose RAM
is a shared file, running only its firmware (SeaBIOS finds no boot device and idles).
That is a running VM with vCPUs and RAM that QEMU migrates, in a second of boot; the
real-guest tests (tests/qemu/) boot a Linux kernel instead.

Each QEMU has two QMP sockets: ``qmp`` for the test, ``vfiod_qmp`` for the daemon (QEMU
serves one client per socket). RAM is ``ram_mib`` MiB + 8 KiB (§8.4: a multiple of 256
KiB loses dirty pages under TCG); guest-physical addresses below the RAM size are file
offsets (one low-memory block on q35). ``QmpClient`` is the test's own QMP conversation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from tests.support.daemons import wait_until

QEMU = "qemu-system-x86_64"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class QmpClient:
    """One QMP connection: greeting, ``qmp_capabilities``, then ``execute``."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        greeting = json.loads(self.file.readline())
        assert "QMP" in greeting, greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError(f"QMP closed while waiting for {command}")
            answer = json.loads(line)
            if "event" in answer:
                self.events.append(answer)
            elif "error" in answer:
                raise RuntimeError(f"QMP {command}: {answer['error']}")
            elif "return" in answer:
                return answer["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class FirmwareVm:
    """``start`` a QEMU in ``workdir`` named ``name``; ``incoming_port``: wait for an
    incoming migration there (``-S``)."""

    def __init__(self, workdir: Path, name: str, ram_mib: int = 64,
                 incoming_port: int | None = None) -> None:
        self.name = name
        self.ram_path = workdir / f"{name}.ram"
        self.qmp = str(workdir / f"{name}.qmp")
        self.vfiod_qmp = str(workdir / f"{name}.vfiod.qmp")
        self.ram_size = ram_mib * (1 << 20) + 8192
        size = f"{self.ram_size // 1024}K"
        cmd = [QEMU, "-nodefaults", "-display", "none", "-accel", "tcg",
               "-machine", "q35,memory-backend=ram0", "-m", size,
               "-object", f"memory-backend-file,id=ram0,size={size},mem-path={self.ram_path},"
               "share=on",
               "-qmp", f"unix:{self.qmp},server=on,wait=off",
               "-qmp", f"unix:{self.vfiod_qmp},server=on,wait=off", "-serial", "none"]
        if incoming_port is not None:
            cmd += ["-S", "-incoming", f"tcp:127.0.0.1:{incoming_port}"]
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self._ready(), 30, f"QEMU {name} to offer its QMP sockets")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"QEMU {self.name} exited {self.proc.returncode}: "
                                 f"{self.log_path.read_text(errors='replace')}")
        return os.path.exists(self.qmp) and os.path.exists(self.vfiod_qmp)

    def query(self, command: str, **arguments: Any) -> Any:
        c = QmpClient(self.qmp)
        try:
            return c.execute(command, **arguments)
        finally:
            c.close()

    def status(self) -> str:
        return str(self.query("query-status")["status"])

    def ram(self, offset: int, length: int) -> bytes:
        with open(self.ram_path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def __enter__(self) -> FirmwareVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
