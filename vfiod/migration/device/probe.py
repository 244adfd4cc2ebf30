"""Which migration driver a device gets (docs/architecture.md §1 step 4; docs/kernel-contract.md §5.1, §6.1–§6.2):
v2 when ``VFIO_DEVICE_FEATURE MIGRATION`` GET answers with the mandatory STOP_COPY, else v1
when the device has a migration region (type 3, subtype 1), else ``NotMigratable`` naming
the concrete reason for both.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from vfiod.abi.v1 import (
    VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED,
    VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
)
from vfiod.abi.vfio import VFIO_MIGRATION_STOP_COPY
from vfiod.errors import KernelError, NotMigratable
from vfiod.migration.device.protocol import MigrationDriver
from vfiod.migration.device.v1 import V1Driver
from vfiod.migration.device.v2 import V2Driver

if TYPE_CHECKING:
    from vfiod.vfio.device import Device

__all__ = ["probe"]


def probe(device: Device) -> MigrationDriver:
    """The driver for ``device``: v2 first, then v1, else NotMigratable with the reason."""
    v2_reason: str
    try:
        flags = device.mig_flags()
    except KernelError as e:
        # pre-6.18 drivers without a device_feature op answer EINVAL for any feature
        if e.errno != errno.EINVAL:
            raise
        flags, v2_reason = None, "VFIO_DEVICE_FEATURE MIGRATION: EINVAL"
    else:
        v2_reason = "VFIO_DEVICE_FEATURE MIGRATION: ENOTTY"
    if flags is not None:
        if flags & VFIO_MIGRATION_STOP_COPY:
            return V2Driver(device, flags)
        v2_reason = (f"VFIO_DEVICE_FEATURE MIGRATION: flags {flags:#x} lack the mandatory "
                     "STOP_COPY")
    region = device.find_region(VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
                                VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED)
    if region is None:
        raise NotMigratable(device.name, f"{v2_reason} and no v1 migration region")
    try:
        return V1Driver(device, region)
    except ValueError as e:
        raise NotMigratable(device.name, f"{v2_reason} and an unusable v1 migration "
                            f"region: {e}") from None
