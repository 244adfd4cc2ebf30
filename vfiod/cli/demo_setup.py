"""The two hosts ``vfiod demo`` assembles, as an operator would: one directory per host
holding its configuration file (docs/architecture.md §6: ``vfiod run`` reads nothing
else), its state directory (the journal), its control socket, its daemon's log and its
simulated ``/sys`` and ``/dev`` trees.

Both configurations define guest ``vm1``: ``start = "running"`` on the source,
``"incoming"`` on the destination. RAM = region ``ram`` plus a 32 MiB region
``dma-pool`` at its top (4 GiB in all by default), sparse memfds. Three devices, each in
its own IOMMU group, paired between the hosts by their ids (their names differ, as
addresses do between hosts; docs/architecture.md §1.5):

* ``v1``: an emulated (mdev) vGPU-like device speaking migration v1 (the region
  protocol, docs/kernel-contract.md §5);
* ``v2pre``: a PCI VF with migration v2 STOP_COPY|PRE_COPY (docs/kernel-contract.md §6);
* ``v2opt``: a PCI VF with v2 STOP_COPY only, configured with
  ``pre_copy_dirty_page_tracking = false`` (QEMU's x-pre-copy-dirty-page-tracking=off).

All three log their DMA (docs/kernel-contract.md §7). ``v1`` and ``v2pre`` share
container ``c0``, which maps all RAM; ``v2opt``'s container ``c1`` maps only
``dma-pool``. The source's ``[[sim.workload]]`` fills ``ram`` with data and keeps writing
guest RAM by device DMA, so pre-copy has dirty pages to chase. Every listener is on
127.0.0.1; port 0 lets the daemon pick a free one, which ``vfiod ctl status`` reports.

``sim_hosts`` writes the simulated pair; a QEMU variant (issue 13 item 5, ``--qemu``)
would write its own pair here (RAM from QEMU's shared files, a ``runstate`` socket) and
share every later step of ``demo_run``.
"""

from __future__ import annotations

import argparse
import grp
import os
import re
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
DMA_POOL = 32 * MiB
GUEST = "vm1"


@dataclass(frozen=True)
class DemoHostFiles:
    """Where one host's files are; ``role`` is "source" or "destination"."""

    role: str
    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "vfiod.toml"

    @property
    def control_socket(self) -> Path:
        return self.dir / "control.sock"

    @property
    def log(self) -> Path:
        return self.dir / "daemon.log"

    @property
    def sim_root(self) -> Path:
        return self.dir / "host"


@dataclass(frozen=True)
class DemoDevice:
    id: str
    capability: str                # a vfiod.kernel.sim.migration capability set
    kind: str                      # pci | mdev
    names: tuple[str, str]         # on the source, on the destination
    container: str
    pre_copy_dirty_page_tracking: bool
    describe: str


DEVICES = (
    DemoDevice("v1", "v1_log", "mdev", ("6c4e8e12-0b1a-4d1e-9d4f-2b7a3c5e0a11",
                                        "8d2f0c34-7e55-4c6b-a1d2-9e3b4f6a7c22"),
               "c0", True, "migration v1 (region), mdev, DMA logging"),
    DemoDevice("v2pre", "v2_precopy_log", "pci", ("0000:3e:00.1", "0000:81:00.1"), "c0", True,
               "migration v2 STOP_COPY|PRE_COPY, DMA logging"),
    DemoDevice("v2opt", "v2_stop_copy_log", "pci", ("0000:3c:00.1", "0000:82:00.1"), "c1",
               False, "migration v2 STOP_COPY, DMA logging, pre_copy_dirty_page_tracking = "
               "false"),
)
#: each device's state: a few hundred KiB, re-dirtied while it runs
DEVICE_STATE = {"state_size": 256 * 1024, "precopy_size": 512 * 1024, "dirty_rate": 8192}


def ram_bytes(args: argparse.Namespace) -> int:
    """``--ram-gib`` in bytes (a multiple of 2 MiB); ``SystemExit`` naming the option
    if the guest cannot hold the pool or the fill."""
    n = int(args.ram_gib * GiB) // (2 * MiB) * (2 * MiB)
    if n < 4 * DMA_POOL:
        raise SystemExit(f"vfiod demo: --ram-gib {args.ram_gib} is too small "
                         f"(at least {4 * DMA_POOL / GiB:.3f})")
    if not 0 <= args.fill_mib * MiB <= n - DMA_POOL:
        raise SystemExit(f"vfiod demo: --fill-mib {args.fill_mib} does not fit the RAM")
    return n


def check_args(args: argparse.Namespace) -> None:
    """What ``vfiod demo``'s options must satisfy, checked before anything starts."""
    ram_bytes(args)
    if not 0 <= args.migration_port <= 65535:
        raise SystemExit(f"vfiod demo: --migration-port {args.migration_port} is not a TCP "
                         "port (0-65535; 0 picks a free one)")


def control_group() -> str | None:
    """This user's primary group: the daemons let its members use their control sockets,
    so the demo's ``vfiod ctl`` works without root (None: a name vfiod would refuse)."""
    try:
        name = grp.getgrgid(os.getgid()).gr_name
    except KeyError:
        return None
    return name if re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}\$?", name) else None


def sim_hosts(workdir: Path, args: argparse.Namespace) -> tuple[DemoHostFiles, DemoHostFiles]:
    """Write the source's and the destination's directories and configurations."""
    ram = ram_bytes(args)
    out = []
    for side, role in enumerate(("source", "destination")):
        files = DemoHostFiles(role, workdir / role)
        files.dir.mkdir(mode=0o700)
        files.config.write_text(sim_config(files, args, ram, side))
        out.append(files)
    return out[0], out[1]


def sim_config(files: DemoHostFiles, args: argparse.Namespace, ram: int, side: int) -> str:
    """One host's ``vfiod.toml`` (``side`` 0: the source, 1: the destination)."""
    source = side == 0
    port = 0 if source else args.migration_port
    group = control_group()
    text = (f'[control]\nsocket = "{files.control_socket}"\n'
            + (f'group = "{group}"\n' if group else "") + "\n"
            '[metrics]\nlisten = "127.0.0.1:0"\n\n'
            f'[migration]\nlisten = "127.0.0.1:{port}"\n'
            f"downtime_limit_ms = {args.downtime_limit_ms:g}\n")
    if source and args.bandwidth_mbps:
        text += f"bandwidth_limit = {int(args.bandwidth_mbps * 1e6)}\n"
    text += (f'\n[paths]\nstate = "{files.dir / "state"}"\n\n'
             f'[[guest]]\nname = "{GUEST}"\nstart = "{"running" if source else "incoming"}"\n'
             f'[[guest.ram]]\nname = "ram"\nsize = {ram - DMA_POOL}\n'
             f'[[guest.ram]]\nname = "dma-pool"\ngpa = {ram - DMA_POOL}\nsize = {DMA_POOL}\n')
    for d in DEVICES:
        text += (f'[[guest.device]]\nname = "{d.names[side]}"\nid = "{d.id}"\n'
                 f'container = "{d.container}"\n')
        if not d.pre_copy_dirty_page_tracking:
            text += "pre_copy_dirty_page_tracking = false\n"
    text += '[[guest.container]]\nname = "c1"\nmap = ["dma-pool"]\n\n[sim]\n'
    for d in DEVICES:
        text += (f'[[sim.device]]\nname = "{d.names[side]}"\ncapability = "{d.capability}"\n'
                 f'kind = "{d.kind}"\n'
                 + "".join(f"{k} = {v}\n" for k, v in DEVICE_STATE.items()))
    if source:
        text += (f'[[sim.workload]]\nguest = "{GUEST}"\n'
                 f"dirty_rate = {int(args.dirty_mbps * 1e6)}\nfill = {args.fill_mib * MiB}\n"
                 f"seed = {args.seed}\n")
    return text
