"""Every reset of a claimed device is logged with its reason (``claim_running``,
vfiod/migration/guest/devices.py): an operator reading the journal learns that vfiod
reset a device a previous owner had left stopped, and why; a RUNNING device is claimed
without a reset and without that line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.support.driver_rig import Side, spec_for
from vfiod.migration.guest.devices import claim_running
from vfiod.migration.states import MigState


def test_a_claim_reset_is_logged_with_its_reason(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    side = Side.build(tmp_path, spec_for("v2_stop_copy"))
    try:
        side.device.set_mig_state(MigState.STOP)
        with caplog.at_level(logging.INFO, logger="vfiod.migration.guest.devices"):
            claim_running(side.name, side.device)
        (rec,) = [r for r in caplog.records if "VFIO_DEVICE_RESET" in r.getMessage()]
        assert rec.levelno == logging.WARNING
        assert rec.getMessage() == (f"{side.name}: VFIO_DEVICE_RESET: found in STOP, not "
                                    "RUNNING (left there by a previous owner); reset to "
                                    "RUNNING before claiming it")
    finally:
        side.close()


def test_a_running_device_is_claimed_without_a_reset_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    side = Side.build(tmp_path, spec_for("v2_precopy"))
    try:
        with caplog.at_level(logging.DEBUG, logger="vfiod.migration.guest.devices"):
            claim_running(side.name, side.device)
        assert not [r for r in caplog.records if "RESET" in r.getMessage()]
    finally:
        side.close()
