"""probe(): v2 first, then v1, else NotMigratable with the concrete reason (docs/architecture.md §1.4;
docs/kernel-contract.md §5.1, §6.1–§6.2)."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest

from tests.support.driver_rig import CAPS, Side, spec_for
from vfiod.errors import KernelError, NotMigratable
from vfiod.migration.device.probe import probe
from vfiod.migration.device.protocol import MigrationDriver
from vfiod.migration.device.v1 import V1Driver
from vfiod.migration.device.v2 import V2Driver
from vfiod.migration.states import MigState

EXPECT = {  # cap -> (class, protocol, has_precopy, has_p2p, migration_flags, capability_names)
    "v1": (V1Driver, "v1", True, False, 0, ("V1_REGION",)),
    "v2_stop_copy": (V2Driver, "v2", False, False, 1, ("STOP_COPY",)),
    "v2_p2p": (V2Driver, "v2", False, True, 3, ("STOP_COPY", "P2P")),
    "v2_precopy": (V2Driver, "v2", True, False, 5, ("STOP_COPY", "PRE_COPY")),
    "v2_precopy_p2p": (V2Driver, "v2", True, True, 7, ("STOP_COPY", "P2P", "PRE_COPY")),
}


@pytest.fixture
def side(tmp_path: Path, request: pytest.FixtureRequest):
    spec = request.param if not isinstance(request.param, str) else spec_for(request.param)
    s = Side.build(tmp_path, spec)
    yield s
    s.close()


@pytest.mark.parametrize("side", CAPS, indirect=True)
def test_probe_picks_the_protocol_and_capabilities(side: Side) -> None:
    cap = next(c for c in CAPS if spec_for(c).name == side.name)
    cls, protocol, pre, p2p, flags, names = EXPECT[cap]
    d = probe(side.device)
    assert isinstance(d, cls) and isinstance(d, MigrationDriver)
    assert (d.protocol, d.has_precopy, d.has_p2p) == (protocol, pre, p2p)
    assert d.device_name == side.name and d.state() is MigState.RUNNING
    # what callers show and compare, answered by every driver (v1: no flags, its region)
    assert d.migration_flags == flags
    assert d.capability_names == names
    assert d.rollback_log == ()                   # no rollback yet


@pytest.mark.parametrize("side", ["not_migratable"], indirect=True)
def test_not_migratable_says_why(side: Side) -> None:
    with pytest.raises(NotMigratable) as ei:
        probe(side.device)
    assert ei.value.device == side.name
    assert ei.value.reason == ("VFIO_DEVICE_FEATURE MIGRATION: ENOTTY and no v1 migration "
                               "region")
    assert str(ei.value) == f"{side.name} is not migratable: {ei.value.reason}"


@pytest.mark.parametrize("side", [dataclasses.replace(
    spec_for("not_migratable"), extra={"unknown_feature_errno": errno.EINVAL})],
    indirect=True)
def test_pre_6_18_einval_counts_as_no_v2(side: Side) -> None:
    with pytest.raises(NotMigratable, match="MIGRATION: EINVAL and no v1 migration region"):
        probe(side.device)


@pytest.mark.parametrize("side", ["v1"], indirect=True)
def test_v1_is_found_after_v2_fails(side: Side) -> None:
    d = probe(side.device)
    assert isinstance(d, V1Driver)
    assert d.region.index >= 9 and d.region.type == 3 and d.region.subtype == 1
    # the v2 question was asked first, and answered ENOTTY
    assert side.faults.log.index("ioctl:VFIO_DEVICE_FEATURE@" + side.name) < \
        side.faults.log.index("ioctl:VFIO_DEVICE_GET_REGION_INFO@" + side.name)


@pytest.mark.parametrize("side", ["v2_precopy"], indirect=True)
def test_flags_without_stop_copy_are_not_v2(side: Side, monkeypatch) -> None:
    monkeypatch.setattr(side.device, "mig_flags", lambda: 0x4)
    with pytest.raises(NotMigratable, match=r"flags 0x4 lack the mandatory STOP_COPY "
                                            r"and no v1 migration region"):
        probe(side.device)


@pytest.mark.parametrize("side", ["v2_precopy"], indirect=True)
def test_other_errors_are_not_hidden(side: Side) -> None:
    side.faults.inject("ioctl:VFIO_DEVICE_FEATURE", errno.EIO)
    with pytest.raises(KernelError) as ei:
        probe(side.device)
    assert ei.value.errno == errno.EIO and "MIGRATION" in str(ei.value)


@pytest.mark.parametrize("side", ["v1"], indirect=True)
def test_unusable_v1_region_says_why(side: Side, monkeypatch) -> None:
    real = side.device.find_region(3, 1)
    assert real is not None
    small = dataclasses.replace(real, size=16)
    monkeypatch.setattr(side.device, "find_region", lambda t, s: small)
    with pytest.raises(NotMigratable, match=r"ENOTTY and an unusable v1 migration region: "
                                            r".*>= 32 bytes \(size 16"):
        probe(side.device)
