"""Two ``vfiod run --backend linux`` daemons in the guest (docs/testing.md "The real-kernel
tier"), as test_daemon.py, test_native_dma_daemons.py and bench_native_dma_rss.py start
them: P owns device ``a`` with guest ``g1`` running, Q owns device ``b`` with ``g1``
incoming, both with a migration listener on 127.0.0.1. Each guest's RAM is a file under
/dev/shm (a VMM's shared memory), so a test reads what the guests hold: P's with a random
MiB at its start, Q's all zero. Every wait is bounded (``LinuxDaemon``)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.kernel.guest import rig
from tests.support.daemons import LinuxDaemon

MiB = 1 << 20
RAM_BYTES = 16 * MiB
GUEST = "g1"
#: the device's id in both daemons' configs: their device names differ, and migrations
#: pair devices by id
DEVICE_ID = "uart0"


def guest_config(device: str, ram: Path, *, start: str) -> str:
    """One guest ``g1`` owning ``device`` (id ``DEVICE_ID``), its RAM the file ``ram`` (a
    VMM's shared memory), incoming migrations accepted on an ephemeral loopback port."""
    return ('[migration]\nlisten = "127.0.0.1:0"\n'
            f'\n[[guest]]\nname = "{GUEST}"\nstart = "{start}"\n'
            f'[[guest.ram]]\nname = "ram0"\nsize = "{RAM_BYTES // MiB}MiB"\npath = "{ram}"\n'
            f'[[guest.device]]\nname = "{device}"\nid = "{DEVICE_ID}"\n')


@dataclass(frozen=True)
class DaemonPair:
    p: LinuxDaemon              # owns device a; g1 runs here at first
    q: LinuxDaemon              # owns device b; g1 incoming
    p_ram: Path
    q_ram: Path


@contextmanager
def linux_daemon_pair(a: str, b: str, tag: str, *, seed: int, env: dict[str, str] | None = None,
                prepare: Callable[[Path], None] | None = None) -> Iterator[DaemonPair]:
    """P and Q, both READY; ``tag`` names their files, ``seed`` P's random MiB, ``env``
    goes to both daemons' environment; ``prepare(p_ram)`` runs once the RAM files are
    written and before the daemons start (they then own the devices). Both daemons are
    killed and their files removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=f"vfiod-{tag}-"))
    p_ram, q_ram = (Path("/dev/shm") / f"vfiod-{tag}-{n}-{u[:8]}" for n, u in (("p", a), ("q", b)))
    daemons: list[LinuxDaemon] = []
    try:
        with open(p_ram, "wb") as f:
            f.truncate(RAM_BYTES)
            f.write(np.random.default_rng(seed).integers(0, 256, MiB, dtype=np.uint8).tobytes())
        with open(q_ram, "wb") as f:
            f.truncate(RAM_BYTES)
        if prepare is not None:
            prepare(p_ram)
        rig.loopback_up()
        daemons.append(LinuxDaemon("P", guest_config(a, p_ram, start="running"), work, env))
        daemons.append(LinuxDaemon("Q", guest_config(b, q_ram, start="incoming"), work, env))
        for d in daemons:               # both start at once; their start-ups overlap
            d.wait_ready()
        yield DaemonPair(daemons[0], daemons[1], p_ram, q_ram)
    finally:
        for d in daemons:
            d.kill()
        for ram in (p_ram, q_ram):
            ram.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
