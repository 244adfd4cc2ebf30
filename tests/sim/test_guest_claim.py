"""A device vfiod claims for a guest must be RUNNING (``claim_running``,
vfiod/migration/guest/devices.py).

Closing a device fd does not always return it to RUNNING: the real mtty sample on Linux
6.12 keeps STOP across close and reopen (seen in the kernel tier). A device left stopped
by a previous owner is reset before vfiod migrates it, never migrated from STOP.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.driver_rig import Side, spec_for
from vfiod.migration.guest.devices import claim_running
from vfiod.migration.states import MigState


@pytest.mark.parametrize("cap", ["v2_precopy_p2p", "v2_stop_copy", "v1"])
def test_a_device_left_stopped_is_reset_to_running(tmp_path: Path, cap: str) -> None:
    side = Side.build(tmp_path, spec_for(cap))
    try:
        # a previous owner stopped it (v2: SET STOP; v1: device_state 000, kept reserved bits)
        if cap == "v1":
            index = side.device.find_region(3, 1).index
            word = int.from_bytes(side.device.read_region(index, 0, 4), "little")
            side.device.write_region(index, 0, (word & ~7).to_bytes(4, "little"))
        else:
            side.device.set_mig_state(MigState.STOP)
        assert side.kernel_state() is MigState.STOP
        resets = side.resets()
        drv = claim_running(side.name, side.device)
        assert side.kernel_state() is MigState.RUNNING and drv.state() is MigState.RUNNING
        assert side.resets() == resets + 1
    finally:
        side.close()


def test_a_running_device_is_claimed_untouched(tmp_path: Path) -> None:
    side = Side.build(tmp_path, spec_for("v2_precopy"))
    try:
        resets = side.resets()
        claim_running(side.name, side.device)
        assert side.kernel_state() is MigState.RUNNING and side.resets() == resets
    finally:
        side.close()
