"""The ``[sim]`` table of the daemon configuration: the simulated host that
``vfiod run --backend sim`` builds (docs/architecture.md §6), validated like the rest of the file.

    [sim]
    iommu_dirty_tracking = false         # its IOMMU has A/D bits (IOMMU_HW_CAP_DIRTY_TRACKING)
    memlock_limit = "8GiB"               # RLIMIT_MEMLOCK for DMA pinning (absent: unlimited)
    debugfs = "vfio"                     # what debugfs shows ([[observe]] devices read it):
                                         # "vfio", "no-vfio" (no CONFIG_VFIO_DEBUGFS),
                                         # "unmounted", "denied" (vfiod not root)
    [[sim.device]]
    name = "0000:3b:00.1"
    capability = "v2_precopy_p2p_log"    # a vfiod.kernel.sim.migration capability set
    [[sim.host_device]]                  # bound to a host driver: "not ours"
    name = "0000:3b:00.0"
    driver = "mlx5_core"
    [[sim.workload]]
    guest = "g1"
    dirty_rate = "16MiB"                 # bytes per second its devices DMA into guest RAM
    fill = "64MiB"                       # initial content written before the guest runs
    gpa = "32MiB"                        # optional: write only guest-physical [gpa, gpa +
    size = "16MiB"                       # size), e.g. a range a real guest reserved
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from vfiod.daemon.config_toml import DEVICE_NAME, NAME, Table


@dataclass(frozen=True)
class SimDeviceConfig:
    name: str
    capability: str
    group: int | None = None
    kind: str = "pci"
    state_size: int | None = None
    precopy_size: int | None = None
    dirty_rate: int | None = None


@dataclass(frozen=True)
class SimHostDeviceConfig:
    name: str
    driver: str | None
    group: int | None = None


@dataclass(frozen=True)
class SimWorkload:
    guest: str
    dirty_rate: int                # bytes of guest RAM written per second (device DMA)
    fill: int = 0                  # bytes of initial content written before it runs
    seed: int = 1
    #: guest-physical (start, size) the devices write; None: their first mapping
    span: tuple[int, int] | None = None


@dataclass(frozen=True)
class SimConfig:
    devices: tuple[SimDeviceConfig, ...] = ()
    host_devices: tuple[SimHostDeviceConfig, ...] = ()
    workloads: tuple[SimWorkload, ...] = ()
    iommu_dirty_tracking: bool = False
    memlock_limit: int | None = None
    debugfs: str = "vfio"          # vfiod.kernel.sim.debugfs DEBUGFS_MODES


#: The simulator holds a device's state in memory: a clear ceiling, far above any test's.
MAX_SIM_STATE = 1 << 30


def parse_sim(t: Table) -> SimConfig:
    """The ``[sim]`` table; without one, the defaults, and the simulated kernel is not
    imported: a production daemon (``--backend linux``) never loads its modules (0.9 MiB
    of every daemon, docs/benchmarks.md §2)."""
    if not t.data:
        return SimConfig()
    # the names a [sim] table may use are the simulator's own
    from vfiod.kernel.sim.debugfs import DEBUGFS_MODES
    from vfiod.kernel.sim.migration.specs import CAPABILITY_NAMES
    devices = []
    for d in t.tables("device"):
        devices.append(SimDeviceConfig(
            str(d.string("name", required=True, pattern=DEVICE_NAME)),
            d.choice("capability", CAPABILITY_NAMES, "v2_precopy_p2p"),
            d.integer("group", None, low=0, high=1 << 20),
            d.choice("kind", ("pci", "mdev"), "pci"),
            d.size("state_size", None, low=1, high=MAX_SIM_STATE),
            d.size("precopy_size", None, low=0, high=MAX_SIM_STATE),
            d.size("dirty_rate", None, low=0)))
        d.finish()
    hosts = []
    for h in t.tables("host_device"):
        driver = h.string("driver", "ixgbe")
        hosts.append(SimHostDeviceConfig(str(h.string("name", required=True,
                                                      pattern=DEVICE_NAME)),
                                         driver or None, h.integer("group", None, low=0)))
        h.finish()
    loads = []
    for w in t.tables("workload"):
        span = None
        if w.has("gpa") or w.has("size"):
            span = (int(w.size("gpa", required=True, low=0) or 0),
                    int(w.size("size", required=True, low=1) or 0))
        loads.append(SimWorkload(str(w.string("guest", required=True, pattern=NAME)),
                                 int(w.size("dirty_rate", required=True, low=0) or 0),
                                 int(w.size("fill", 0, low=0) or 0),
                                 int(w.integer("seed", 1, low=0) or 0), span))
        w.finish()
    cfg = SimConfig(tuple(devices), tuple(hosts), tuple(loads),
                    t.boolean("iommu_dirty_tracking", False),
                    t.size("memlock_limit", None, low=0),
                    t.choice("debugfs", DEBUGFS_MODES, "vfio"))
    t.finish()
    return cfg


def check_sim(sim: SimConfig, t: Table, guests: Collection[str]) -> None:
    """What only the whole file shows: a simulated device defined twice, a workload for a
    guest the file does not define."""
    names: list[str] = []
    sims: list[tuple[str, list[str]]] = [
        ("device", [d.name for d in sim.devices]),
        ("host_device", [h.name for h in sim.host_devices])]
    for key, items in sims:
        for i, item in enumerate(items):
            if item in names:
                raise t.tables(key)[i].error("name", f"simulated device {item} is "
                                             "defined twice")
            names.append(item)
    for i, w in enumerate(sim.workloads):
        if w.guest not in guests:
            raise t.tables("workload")[i].error("guest", f"no [[guest]] named {w.guest!r}")
