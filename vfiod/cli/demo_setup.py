"""The simulated hypervisor host ``vfiod demo`` runs on, one per process (source and
destination), built the same way on both sides with device names of each host.

Guest ``vm1``: RAM = region ``ram`` plus a 32 MiB region ``dma-pool`` at its top (4 GiB in
all by default), each a sparse memfd. Three devices, each in its own IOMMU group:

* ``v1``: an emulated (mdev) vGPU-like device speaking migration v1 (the region protocol);
* ``v2pre``: a PCI VF with migration v2 STOP_COPY|PRE_COPY (hisi-like);
* ``v2opt``: a PCI VF with v2 STOP_COPY only, configured with
  ``pre_copy_dirty_page_tracking = false`` (QEMU's x-pre-copy-dirty-page-tracking=off).

Each device's role is its id, which the destination pairs it by (the names differ).
All three log their DMA (device DMA logging), so tracking is precise. Containers: ``c0``
(v1 + v2pre) maps all RAM; ``c1`` (v2opt) maps only ``dma-pool``, the window that device
DMAs into. While v2opt runs, c1's bitmap is not queried and its 32 MiB count as dirty
(docs/architecture.md §3): the predictor includes them, and they are collected precisely in
stop-and-copy. ``build_side`` assembles the guest with ``build_guest``, the builder the
daemon and the tests use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from vfiod.kernel.sim import SimHost
from vfiod.kernel.sim.interfaces import DeviceSpec
from vfiod.kernel.sim.migration import capability_specs
from vfiod.kernel.sim.workload import DmaTarget
from vfiod.migration.guest import ContainerPlan, DevicePlan, Guest, GuestPlan, build_guest
from vfiod.migration.planning.hostfacts import HostFacts, gather_host_facts
from vfiod.vfio import HostPaths, RamRegion

MiB = 1 << 20
GiB = 1 << 30
DMA_POOL = 32 * MiB
#: device state sizes: a few hundred KiB of state, re-dirtied while running
DEVICE_STATE = {"state_size": 256 * 1024, "precopy_size": 512 * 1024, "dirty_rate": 8192}


@dataclass(frozen=True)
class DemoDevice:
    role: str                      # v1 | v2pre | v2opt
    spec: DeviceSpec
    container: str
    pre_copy_dirty_page_tracking: bool
    describe: str


def demo_devices(side: str) -> list[DemoDevice]:
    """The three devices; ``side`` "source" or "destination" picks each host's names."""
    specs = capability_specs(**DEVICE_STATE)
    src = side == "source"
    v1 = dataclasses.replace(
        specs["v1_log"], kind="mdev",
        name=("6c4e8e12-0b1a-4d1e-9d4f-2b7a3c5e0a11" if src
              else "8d2f0c34-7e55-4c6b-a1d2-9e3b4f6a7c22"),
        extra={**specs["v1_log"].extra, "parent": "nvidia0", "mdev_type": "nvidia-259",
               "mdev_type_name": "GRID T4-2Q"},
        seed=11 if src else 71)
    pre = dataclasses.replace(specs["v2_precopy_log"],
                              name="0000:3e:00.1" if src else "0000:81:00.1",
                              seed=12 if src else 72)
    opt = dataclasses.replace(specs["v2_stop_copy_log"],
                              name="0000:3c:00.1" if src else "0000:82:00.1",
                              seed=13 if src else 73)
    return [
        DemoDevice("v1", v1, "c0", True, "migration v1 (region), mdev, DMA logging"),
        DemoDevice("v2pre", pre, "c0", True, "migration v2 STOP_COPY|PRE_COPY, DMA logging"),
        DemoDevice("v2opt", opt, "c1", False, "migration v2 STOP_COPY, DMA logging, "
                   "pre_copy_dirty_page_tracking = false"),
    ]


def demo_plan(devices: list[DemoDevice], ram_bytes: int) -> GuestPlan:
    """Guest ``vm1`` as the module docstring describes it."""
    if ram_bytes < 2 * DMA_POOL or ram_bytes % (2 * MiB):
        raise ValueError(f"guest RAM {ram_bytes} bytes: need a multiple of 2 MiB and at "
                         f"least {2 * DMA_POOL >> 20} MiB")
    pool = RamRegion("dma-pool", ram_bytes - DMA_POOL, DMA_POOL)
    return GuestPlan(
        "vm1", (RamRegion("ram", 0, ram_bytes - DMA_POOL), pool),
        tuple(DevicePlan(d.spec.name, d.container, d.pre_copy_dirty_page_tracking, d.role)
              for d in devices),
        (ContainerPlan("c1", ((pool.gpa, pool.size),)),))


@dataclass
class DemoSide:
    side: str
    root: Path
    host: SimHost
    guest: Guest
    devices: list[DemoDevice]
    facts: HostFacts

    def close(self) -> None:
        try:
            self.guest.close()
        finally:
            self.host.close()

    def models(self) -> list[str]:
        """Device model digests in demo order (source and destination compare equal)."""
        out = []
        for d in self.devices:
            model = self.host.device(d.spec.name).parts.model
            out.append(str(getattr(model, "digest", lambda: "")()))
        return out

    def workload_targets(self) -> list[DmaTarget]:
        """Where each source device DMAs: the two c0 devices into halves of the first
        GiB of ``ram`` (their buffer areas), v2opt into the dma-pool."""
        ram = self.guest.ram[0]
        pool = self.guest.ram[1]
        area = min(512 * MiB, ram.size // 2) // (2 * MiB) * (2 * MiB)
        d = {x.role: x.spec.name for x in self.devices}
        return [DmaTarget(d["v1"], ram.gpa, area, weight=2.0),
                DmaTarget(d["v2pre"], ram.gpa + area, area, weight=2.0),
                DmaTarget(d["v2opt"], pool.gpa, pool.size, weight=1.0)]


def build_side(side: str, root: Path, ram_bytes: int) -> DemoSide:
    devices = demo_devices(side)
    plan = demo_plan(devices, ram_bytes)
    host = SimHost.build(root, [[d.spec] for d in devices])
    try:
        guest = build_guest(host.kernel, plan, HostPaths(host.sysfs_root, host.dev_root))
    except BaseException:
        host.close()
        raise
    try:
        # the simulated kernel answers memlock itself (as if vfiod had CAP_IPC_LOCK)
        facts = gather_host_facts(host.kernel)
    except BaseException:
        guest.close()
        host.close()
        raise
    return DemoSide(side, root, host, guest, devices, facts)
