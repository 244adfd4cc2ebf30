"""The simulated host behind ``vfiod run --backend sim``: built from the config's ``[sim]``
section, so the whole daemon runs anywhere (docs/architecture.md §2: the simulator implements the
same ``KernelOps``; docs/kernel-contract.md §3.1 groups, §5-§7 through the capability sets).

* ``[[sim.device]]``: a VFIO device with a named capability set
  (``vfiod.kernel.sim.migration.capability_specs``: v1, v2_stop_copy, v2_p2p,
  v2_precopy, v2_precopy_p2p, each optionally ``_log`` for DMA logging, or
  not_migratable), optional IOMMU group number (devices sharing a number share a group;
  otherwise each gets its own) and state sizes.
* ``[[sim.host_device]]``: a device bound to a host driver ("not ours"); in the group of a
  VFIO device it makes that group non-viable, as on a real host.
* ``[[sim.workload]]``: a running guest's devices write its RAM by DMA at a rate (so
  migrations have dirty pages to chase), after ``fill`` bytes of initial content.

Without ``--sim-root`` the tree lives in a temporary ``/tmp/vfiod-sim-*`` directory that
records its owner (``OWNER_FILE``: pid and start time); the daemon removes it on a clean
stop, and a daemon starting later removes those whose owner is dead (a SIGKILL leaves
them). A configured root has no owner file and is never removed: a restart needs it (the
fault matrix keeps a crashed host's guest RAM files beside it). Every start rebuilds the
tree in it (``sys/``, ``dev/``, marked by ``TREE_MARK``) from the configuration: the
simulated devices live in the daemon's memory, so after a stop or a crash they come back
reset, as the kernel resets a device when its last fd closes (docs/architecture.md §1
step 8). A ``sys/`` or ``dev/`` there without the mark was not made here: the start is
refused and it is left alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

import psutil

from vfiod.daemon.config_sim import SimConfig, SimWorkload
from vfiod.errors import ConfigError
from vfiod.kernel.sim import HostDevice, SimHost, SimHostConfig
from vfiod.kernel.sim.interfaces import DeviceSpec
from vfiod.kernel.sim.migration import capability_specs
from vfiod.kernel.sim.workload import DmaTarget, Workload, WorkloadConfig, fill
from vfiod.migration.guest import Guest
from vfiod.vfio.discovery import is_vfio_pci_driver

FIRST_GROUP = 10
SIM_ROOT_PREFIX = "vfiod-sim-"
OWNER_FILE = "vfiod.owner"
TREE_MARK = "vfiod-sim.tree"
TREE_DIRS = ("sys", "dev")
#: events the simulated kernel's fault log keeps (``FaultInjector.log_limit``; README
#: "Limits"): a daemon reads none, and every ioctl (a migration makes thousands: a dirty
#: sync per container per pass) would otherwise add one for as long as it runs
FAULT_LOG_LIMIT = 1024

log = logging.getLogger("vfiod.sim")


def _start_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def make_sim_root(tmp: str | None = None) -> str:
    """A fresh temporary root for the simulated host, recording this process as owner."""
    root = tempfile.mkdtemp(prefix=SIM_ROOT_PREFIX, dir=tmp)
    Path(root, OWNER_FILE).write_text(f"{os.getpid()} {_start_time(os.getpid())!r}\n")
    return root


def remove_stale_sim_roots(tmp: str | None = None) -> list[str]:
    """Remove the temporary roots vfiod made whose owner is dead; the removed paths."""
    base = Path(tmp or tempfile.gettempdir())
    removed = []
    for d in sorted(base.glob(SIM_ROOT_PREFIX + "*")):
        try:
            pid_text, started = (d / OWNER_FILE).read_text().split()
            pid = int(pid_text)
            if d.is_symlink() or d.stat().st_uid != os.getuid():
                continue                   # not ours to remove
        except (OSError, ValueError):
            continue                       # no owner file: not made by make_sim_root
        if repr(_start_time(pid)) == started:
            continue                       # its owner still runs (pid and start time)
        shutil.rmtree(d, ignore_errors=True)
        log.info("removed %s: a simulated host left by dead vfiod pid %d", d, pid)
        removed.append(str(d))
    return removed


def clear_old_tree(root: Path) -> bool:
    """Remove the tree an earlier start built in ``root`` (True if there was one), and
    mark ``root`` as holding ours; ``ConfigError`` if a tree there is not ours."""
    mark = root / TREE_MARK
    old = [root / d for d in TREE_DIRS if (root / d).is_symlink() or (root / d).exists()]
    for d in old:
        if not mark.is_file() or d.is_symlink() or not d.is_dir():
            raise ConfigError(f"--sim-root {root}: its {d.name}/ was not made by vfiod's "
                              "simulated host; give an empty directory or one vfiod made")
    for d in old:
        shutil.rmtree(d)
    root.mkdir(parents=True, exist_ok=True)
    mark.write_text("sys/ and dev/ here are rebuilt by every vfiod --backend sim start\n")
    return bool(old)


def build_sim_host(cfg: SimConfig, root: Path) -> SimHost:
    """The simulated host the ``[sim]`` section describes, rooted at ``root`` (a tree an
    earlier start left there is rebuilt: its devices start reset)."""
    if clear_old_tree(root):
        log.info("simulated host rebuilt over %s: its devices start reset, as after a "
                 "crash", root)
    specs = capability_specs()
    taken = {d.group for d in cfg.devices if d.group is not None}
    taken |= {h.group for h in cfg.host_devices if h.group is not None}
    next_group = max(taken | {FIRST_GROUP - 1}) + 1
    groups: dict[int, list[DeviceSpec | HostDevice]] = {}
    for d in cfg.devices:
        sizes = {k: getattr(d, k) for k in ("state_size", "precopy_size", "dirty_rate")
                 if getattr(d, k) is not None}
        base = specs[d.capability]
        # mdev: the parent device is the driver shown in sysfs (host.py picks "mtty" when
        # the spec says vfio-pci); its name must be a UUID, as the kernel names mdevs. A PCI
        # device keeps its set's variant driver if it is one (mlx5_vfio_pci ...), else it
        # is bound to vfio-pci (the v1 set names an mdev vendor driver).
        driver = "vfio-pci" if d.kind == "mdev" or not is_vfio_pci_driver(base.driver) \
            else base.driver
        spec = dataclasses.replace(base, name=d.name, kind=d.kind, driver=driver, **sizes)
        if d.group is None:
            number, next_group = next_group, next_group + 1
        else:
            number = d.group
        groups.setdefault(number, []).append(spec)
    for h in cfg.host_devices:
        if h.group is None:
            number, next_group = next_group, next_group + 1
        else:
            number = h.group
        groups.setdefault(number, []).append(HostDevice(h.name, h.driver))
    try:
        return SimHost.build(root, groups, config=SimHostConfig(
            iommu_dirty_tracking=cfg.iommu_dirty_tracking, memlock_limit=cfg.memlock_limit,
            fault_log_limit=FAULT_LOG_LIMIT, debugfs=cfg.debugfs))
    except ValueError as e:
        raise ConfigError(f"[sim]: the simulated host cannot be built: {e}") from None


def start_workload(host: SimHost, guest: Guest, load: SimWorkload) -> Workload | None:
    """Fill the guest's first RAM region and start its devices' DMA writes; the workload
    pauses whenever the guest stops running (a run-state handler)."""
    if load.fill:
        first = guest.ram[0]
        fill(first.view(), min(load.fill, first.size), seed=load.seed)
    targets = []
    for gc in guest.containers:
        if not gc.mappings:
            continue
        m = gc.mappings[0]
        iova, size = m.iova, m.size
        if load.span is not None:          # only inside [gpa, gpa + size) of that mapping
            lo, hi = max(load.span[0], m.gpa), min(sum(load.span), m.gpa + m.size)
            if hi <= lo:
                raise ConfigError(f"[[sim.workload]] of guest {guest.name}: guest-physical "
                                  f"[{load.span[0]:#x}, {sum(load.span):#x}) is outside "
                                  f"its first DMA mapping [{m.gpa:#x}, {m.gpa + m.size:#x})")
            iova, size = m.iova + lo - m.gpa, hi - lo
        targets += [DmaTarget(name, iova, size) for name in gc.devices]
    if not targets or load.dirty_rate <= 0:
        return None
    ps = guest.page_size
    work = Workload(host, targets, WorkloadConfig(
        dirty_rate_bps=float(load.dirty_rate), min_write=ps,
        max_write=max(ps, 64 * 1024 // ps * ps), page_size=ps, seed=load.seed))
    guest.add_run_state_handler(work.on_run_state)
    work.start()
    return work
