"""The fault matrix's hosts: real ``vfiod run --backend sim`` processes that can be killed
and started again over what they left (docs/architecture.md §1 steps 7-8, the restart).

Each ``FaultHost`` owns a root directory that survives its process::

    ROOT/vfiod.toml        the configuration (written once; a restart reads it again)
    ROOT/sim/              --sim-root: the simulated host's tree (rebuilt by each start,
                           its devices reset, as a crashed host's are)
    ROOT/state/            [paths] state: the journal
    ROOT/ram/GUEST.ram     each guest's RAM as a file ([[guest.ram]] path), so the RAM
                           survives a crash as a VMM's would
    ROOT/control.sock, ROOT/notify.sock, ROOT/daemon.log (every run appended)

``start``, ``sigterm``, ``sigkill``, ``restart``; ``status`` is ``vfiod ctl status --json``'s
answer (asked over the control socket, the same call); ``guest_state`` is the guest's
lifecycle state there, ``where`` "what runs where" over both hosts; ``ram_digest`` hashes a
guest's RAM file. ``netns`` runs the process in a network namespace (``netns.py``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.daemons import NotifySocket, child_env, vfiod_cmd
from tests.support.netns import NetPair, in_netns
from vfiod.api import ControlClient
from vfiod.api.client import ClientError

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
PAGE = 4096


@dataclass(frozen=True)
class RigGuest:
    """One guest of the rig: a RAM file and one simulated device on each host."""

    name: str
    index: int                       # picks its devices' PCI buses (unique per rig)
    ram_bytes: int = 1 << 20
    capability: str = "v2_precopy_p2p_log"
    state_size: int = 64 * 1024      # the device's stop-copy state: makes stop-and-copy last
    dirty_rate: int = 0              # bytes/s its device writes into its RAM on the source

    def device(self, side: str) -> str:
        # PCI addresses differ between hosts, as on real ones
        return f"0000:{(0x10 if side == 'source' else 0x90) + self.index:02x}:00.0"


def pattern(name: str, size: int) -> bytes:
    """The known content of a source guest's RAM: every page distinct, none zero."""
    seed = hashlib.sha256(name.encode()).digest()
    return b"".join(hashlib.sha256(seed + i.to_bytes(8, "little")).digest() * (PAGE // 32)
                    for i in range(size // PAGE))


def host_config(side: str, guests: Sequence[RigGuest], root: Path, listen: str, *,
                migration: str = "", tls: str = "") -> str:
    """``side``: "source" (guests run) or "destination" (guests incoming)."""
    start = "running" if side == "source" else "incoming"
    text = f'[migration]\nlisten = "{listen}"\n{migration}{tls}'
    text += f'\n[paths]\nstate = "{root / "state"}"\n'
    for g in guests:
        text += (f'\n[[guest]]\nname = "{g.name}"\nstart = "{start}"\n'
                 f'[[guest.ram]]\nname = "ram"\nsize = {g.ram_bytes}\n'
                 f'path = "{root / "ram" / (g.name + ".ram")}"\n'
                 f'[[guest.device]]\nname = "{g.device(side)}"\nid = "dev{g.index}"\n')
    text += "\n[sim]\n"
    for g in guests:
        text += (f'[[sim.device]]\nname = "{g.device(side)}"\ncapability = "{g.capability}"\n'
                 f'state_size = {g.state_size}\n')
        if g.dirty_rate and side == "source":
            text += f'[[sim.workload]]\nguest = "{g.name}"\ndirty_rate = {g.dirty_rate}\n'
    return text


class FaultHost:
    """One host: ``config(host)`` gives its configuration text (it may name the host's
    paths); RAM files are made at construction, the source's filled with ``pattern``."""

    def __init__(self, name: str, side: str, guests: Sequence[RigGuest],
                 config: Callable[[FaultHost], str], *, netns: str | None = None) -> None:
        self.name, self.side, self.netns = name, side, netns
        # short paths: a Unix socket path has at most 107 bytes
        self.root = Path(tempfile.mkdtemp(prefix=f"vf-{name}-"))
        for sub in ("ram", "state"):
            (self.root / sub).mkdir()
        for g in guests:
            data = pattern(g.name, g.ram_bytes) if side == "source" else bytes(g.ram_bytes)
            (self.root / "ram" / f"{g.name}.ram").write_bytes(data)
        self.guests = {g.name: g for g in guests}
        self.socket = str(self.root / "control.sock")
        self.config_path = self.root / "vfiod.toml"
        self.config_path.write_text(config(self))
        self.notify = NotifySocket(self.root)
        self.log_path = self.root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    # -- process ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the daemon over the root and wait for READY=1."""
        assert not self.alive(), f"{self.name} runs already"
        self.runs += 1
        after = len(self.notify.messages)
        cmd = vfiod_cmd("run", "--backend", "sim", "--config", str(self.config_path),
                        "--control-socket", self.socket, "--metrics-listen", "",
                        "--sim-root", str(self.root / "sim"))
        if self.netns is not None:
            cmd = in_netns(self.netns, cmd)
        with open(self.log_path, "ab") as log:
            log.write(f"==== {self.name} run {self.runs} ====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=child_env(NOTIFY_SOCKET=self.notify.path,
                                                       PYTHONUNBUFFERED="1"))
        self.notify.wait_for("READY", timeout=START_TIMEOUT, after=after, alive=self._check)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n"
                                 f"{self.log()[-6000:]}")

    def sigkill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def sigterm(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} ignored SIGTERM for {timeout:g} s:\n"
                                 f"{self.log()[-6000:]}") from None

    def restart(self) -> None:
        """Start again over the same root (after a kill or a stop; killed if it runs)."""
        if self.alive():
            self.sigkill()
        self.start()

    def close(self) -> None:
        if self.alive():
            self.sigkill()
        self.notify.close()
        unmount(self.root / "state")
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- what it says ----------------------------------------------------------------------
    def call(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        with ControlClient(self.socket, timeout=30) as c:
            return c.call(op, args)

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def guest(self, name: str) -> dict[str, Any]:
        return dict(self.call("status", {"guest": name})["guests"][0])

    def guest_state(self, name: str) -> str | None:
        """The guest's lifecycle state here; None while the daemon is down."""
        if not self.alive():
            return None
        try:
            return str(self.guest(name)["state"])
        except ClientError:
            return None

    def migrate(self, guest: str, to: str, **args: Any) -> str:
        """Start migrating ``guest`` to ``to`` (HOST:PORT); its migration id."""
        return str(self.call("migrate", {"guest": guest, "to": to, **args})["migration"]["id"])

    def migration(self, guest: str) -> dict[str, Any] | None:
        """The guest's current or last migration record here."""
        m = self.guest(guest)["migration"]
        return dict(m) if m else None

    @property
    def migration_address(self) -> str:
        return str(self.status()["daemon"]["migration_listen"])

    def ram_path(self, guest: str) -> Path:
        return self.root / "ram" / f"{guest}.ram"

    def ram_digest(self, guest: str) -> str:
        return hashlib.sha256(self.ram_path(guest).read_bytes()).hexdigest()

    def journal_text(self) -> str:
        """Everything under the state directory, as text (the journal's records)."""
        return "".join(p.read_text(errors="replace")
                       for p in sorted((self.root / "state").rglob("*")) if p.is_file())


def where(hosts: Sequence[FaultHost], guest: str) -> dict[str, str | None]:
    """What runs where: each host's lifecycle state of ``guest``."""
    return {h.name: h.guest_state(guest) for h in hosts}


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now: a host keeps its migration port across restarts (the peer asks it
    about a migration's outcome there)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def mount_tmpfs(path: Path, size: int) -> None:
    """A small tmpfs over ``path`` (the disk-full cases fill it)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "vfiod-test",
                    str(path)], check=True, capture_output=True, timeout=30)


def unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", str(path)], check=True, capture_output=True, timeout=30)


def fill_disk(directory: Path) -> Path:
    """Write ``directory/filler`` until its file system is full; the file (delete it to
    give the space back)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(bytes(64 * 1024))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                return filler


class FaultPair:
    """A source and a destination host with the same guests (the destination's incoming),
    each listening on a port of its own that it keeps across restarts."""

    def __init__(self, guests: Sequence[RigGuest], *, migration: str = "",
                 tls: Callable[[str], str] | None = None, net: NetPair | None = None,
                 state_tmpfs: int | None = None) -> None:
        """``tls(host name)``: that host's ``[migration.tls]`` table; ``net``: the source
        runs in ``net.a``, the destination in ``net.b``; ``state_tmpfs``: each state
        directory is a tmpfs of that many bytes."""
        self.addr = {"src": net.addr_a if net else "127.0.0.1",
                     "dst": net.addr_b if net else "127.0.0.1"}
        self.ports = {"src": free_port(), "dst": free_port()}
        self.guests = list(guests)

        def config(side: str) -> Callable[[FaultHost], str]:
            return lambda h: host_config(side, guests, h.root,
                                         f"{self.addr[h.name]}:{self.ports[h.name]}",
                                         migration=migration, tls=tls(h.name) if tls else "")
        self.src = FaultHost("src", "source", guests, config("source"),
                             netns=net.a if net else None)
        self.dst = FaultHost("dst", "destination", guests, config("destination"),
                             netns=net.b if net else None)
        self.hosts = (self.src, self.dst)
        if state_tmpfs is not None:
            for h in self.hosts:
                mount_tmpfs(h.root / "state", state_tmpfs)

    @property
    def dst_address(self) -> tuple[str, int]:
        return (self.addr["dst"], self.ports["dst"])

    def start(self) -> None:
        for h in self.hosts:
            h.start()

    def where(self, guest: str) -> dict[str, str | None]:
        return where(self.hosts, guest)

    def close(self) -> None:
        for h in self.hosts:
            h.close()


@contextmanager
def started_pair(guests: Sequence[RigGuest], **kw: Any) -> Iterator[FaultPair]:
    """A ``FaultPair`` (keywords: its own), started, and closed afterwards."""
    p = FaultPair(guests, **kw)
    try:
        p.start()
        yield p
    finally:
        p.close()
