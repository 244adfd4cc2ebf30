"""The migration side of the simulated kernel (docs/kernel-contract.md §5 - §7): what a simulated
device can do beyond plain vfio-pci, built from its ``DeviceSpec`` by ``build_parts``
(the ``BuildParts`` contract of ``vfiod.kernel.sim.interfaces``):

* ``device_model`` -- the device's internal state (changes while running; save/restore)
* ``stream``       -- the opaque migration data stream both protocols carry
* ``v2``           -- VFIO_DEVICE_FEATURE MIGRATION / MIG_DEVICE_STATE / MIG_DATA_SIZE and
                      the kernel's state machine (the only next-hop table in vfiod)
* ``data_fd``      -- the v2 saving / resuming data fds
* ``v1``           -- the v1 migration region
* ``dma_logging``  -- VFIO_DEVICE_FEATURE DMA_LOGGING_START / STOP / REPORT
* ``specs``        -- named capability sets for tests and demos
"""

from __future__ import annotations

from vfiod.kernel.sim.interfaces import DeviceParts, DeviceSpec, FdTable
from vfiod.kernel.sim.migration.device_model import DeviceModel
from vfiod.kernel.sim.migration.dma_logging import DmaLogging
from vfiod.kernel.sim.migration.specs import capability_specs
from vfiod.kernel.sim.migration.v1 import MigrationRegionV1
from vfiod.kernel.sim.migration.v2 import MigrationV2

__all__ = ["build_parts", "capability_specs", "DeviceModel", "DmaLogging",
           "MigrationRegionV1", "MigrationV2"]


def build_parts(spec: DeviceSpec, fds: FdTable) -> DeviceParts:
    """The parts of one simulated device. Bad specs raise ValueError naming the device."""
    model = DeviceModel(spec)
    parts = DeviceParts(model=model)
    if spec.migration == "v2":
        mig = MigrationV2(spec, fds, model)
        parts.features.append(mig)
        parts.resettables.append(mig)
        parts.mig_state = lambda: int(mig.state)
    elif spec.migration == "v1":
        region = MigrationRegionV1(spec, fds.faults, model)
        parts.regions.append(region)
        parts.resettables.append(region)
    elif spec.migration != "none":
        raise ValueError(f"{spec.name}: migration must be 'none', 'v1' or 'v2', "
                         f"not {spec.migration!r}")
    if spec.dma_logging:
        log = DmaLogging(spec)
        parts.features.append(log)
        parts.dma_listeners.append(log)
        parts.closables.append(log)
    return parts
