"""``Device`` feature primitives against the simulator's own migration parts
(``vfiod.kernel.sim.migration.build_parts``, the device kinds of ``capability_specs``):
what a probe answers for each kind of device (docs/kernel-contract.md §6.1, §6.2, §7), and the thin
v2 wrappers driving a real state machine and data fd (§6.3, §6.7, §6.8)."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

import vfiod.abi.vfio as v
from vfiod.abi.v1 import (
    VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED,
    VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
)
from vfiod.abi.vfio import MigState
from vfiod.errors import KernelError
from vfiod.kernel.sim import SimHost
from vfiod.kernel.sim.migration import capability_specs
from vfiod.vfio import Container, Device, Group, HostPaths
from vfiod.vfio.features import migration_flag_names

SPECS = capability_specs(state_size=4096, precopy_size=8192)
_GET, _SET = v.VFIO_DEVICE_FEATURE_GET, v.VFIO_DEVICE_FEATURE_SET
KINDS = ["v2_precopy_p2p_log", "v2_stop_copy", "v1", "not_migratable"]
OLD_MDEV = dataclasses.replace(SPECS["not_migratable"], name="0000:99:00.0",
                               extra={"unknown_feature_errno": errno.EINVAL})


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[dict[str, Device]]:
    specs = [SPECS[k] for k in KINDS] + [OLD_MDEV]
    host = SimHost.build(tmp_path, [[s] for s in specs])
    paths = HostPaths(sysfs_root=host.sysfs_root, dev_root=host.dev_root)
    c = Container.open(host.kernel, paths)
    out: dict[str, Device] = {}
    for number, spec in zip(sorted(host.groups), specs, strict=True):
        g = Group.open(host.kernel, paths, number)
        g.set_container(c)
        if c.iommu_type is None:
            c.set_iommu()
        out[spec.name] = g.get_device(spec.name)
    yield {k: out[SPECS[k].name] for k in KINDS} | {"old_mdev": out[OLD_MDEV.name]}
    c.close()
    leaked = host.kernel.open_files()
    host.close()
    assert not leaked


@pytest.mark.parametrize("kind,migration,state_rw,logging", [
    ("v2_precopy_p2p_log", True, True, True),
    ("v2_stop_copy", True, True, False),
    ("v1", False, False, False),
    ("not_migratable", False, False, False),
    ("old_mdev", False, False, False),       # pre-6.18 "unknown feature" = EINVAL
])
def test_feature_probe_answers(devices: dict[str, Device], kind: str, migration: bool,
                               state_rw: bool, logging: bool) -> None:
    dev = devices[kind]
    assert dev.feature_probe(v.VFIO_DEVICE_FEATURE_MIGRATION, _GET) is migration
    assert dev.feature_probe(v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, _GET | _SET) is state_rw
    assert dev.dma_logging_probe() is logging
    # MIGRATION is GET-only: asking for SET is an unsupported direction (EINVAL) → False
    assert dev.feature_probe(v.VFIO_DEVICE_FEATURE_MIGRATION, _SET) is False


def test_mig_flags_per_kind(devices: dict[str, Device]) -> None:
    assert devices["v2_precopy_p2p_log"].mig_flags() == (
        v.VFIO_MIGRATION_STOP_COPY | v.VFIO_MIGRATION_P2P | v.VFIO_MIGRATION_PRE_COPY)
    assert devices["v2_stop_copy"].mig_flags() == v.VFIO_MIGRATION_STOP_COPY
    assert devices["v1"].mig_flags() is None
    assert devices["not_migratable"].mig_flags() is None
    with pytest.raises(KernelError) as ei:       # EINVAL is not "not migratable": it raises
        devices["old_mdev"].mig_flags()
    assert ei.value.errno == errno.EINVAL


def test_migration_capability_names(devices: dict[str, Device]) -> None:
    flags = devices["v2_precopy_p2p_log"].mig_flags()
    assert flags is not None
    assert migration_flag_names(flags) == ("STOP_COPY", "P2P", "PRE_COPY")
    assert migration_flag_names(v.VFIO_MIGRATION_STOP_COPY) == ("STOP_COPY",)
    assert migration_flag_names(0) == ()


def test_v1_region_is_found_by_type(devices: dict[str, Device]) -> None:
    r = devices["v1"].find_region(VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
                                  VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED)
    assert r is not None and r.index >= v.VFIO_PCI_NUM_REGIONS and r.size > 0
    assert devices["v2_stop_copy"].find_region(VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
                                               VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED) is None


def test_v2_save_through_the_wrappers(devices: dict[str, Device]) -> None:
    dev = devices["v2_precopy_p2p_log"]
    assert dev.get_mig_state() is MigState.RUNNING
    assert dev.mig_data_size() > 0
    fd = dev.set_mig_state(MigState.PRE_COPY)
    assert fd >= 0
    try:
        initial, dirty = dev.precopy_info(fd)
        assert initial > 0 and dirty >= 0
        got = 0
        while got < initial:
            chunk = dev.data_read(fd, initial - got)
            assert chunk
            got += len(chunk)
        assert dev.precopy_info(fd)[0] == 0
        assert dev.set_mig_state(MigState.PRE_COPY_P2P) == -1
        assert dev.set_mig_state(MigState.STOP_COPY) == -1      # same session, same fd
        buf = bytearray(1024)
        while dev.data_readinto(fd, buf):
            pass
        with pytest.raises(KernelError) as ei:
            dev.precopy_info(fd)                  # only valid in the PRE_COPY states
        assert ei.value.errno == errno.EINVAL
        assert str(ei.value).startswith(
            f"VFIO_MIG_GET_PRECOPY_INFO on {dev.name}: EINVAL")
        assert dev.set_mig_state(MigState.RUNNING) == -1        # via STOP
    finally:
        dev.data_close(fd)
    assert dev.get_mig_state() is MigState.RUNNING


def test_unsupported_state_is_einval_named(devices: dict[str, Device]) -> None:
    dev = devices["v2_stop_copy"]
    with pytest.raises(KernelError) as ei:
        dev.set_mig_state(MigState.PRE_COPY)
    assert ei.value.errno == errno.EINVAL
    assert str(ei.value).startswith(
        f"VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE PRE_COPY) on {dev.name}: EINVAL")
    assert dev.get_mig_state() is MigState.RUNNING
    with pytest.raises(ValueError, match="does not fit an unsigned 32-bit"):
        dev.set_mig_state(1 << 32)


def test_failed_arc_then_reset(devices: dict[str, Device]) -> None:
    dev = devices["v2_stop_copy"]
    faults = dev.kernel.faults  # type: ignore[attr-defined]
    faults.inject(f"transition:RUNNING->STOP@{dev.name}", errno.EIO)
    with pytest.raises(KernelError) as ei:
        dev.set_mig_state(MigState.STOP_COPY)
    assert ei.value.errno == errno.EIO
    assert ei.value.op == "VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE STOP_COPY)"
    assert dev.get_mig_state() is MigState.ERROR
    dev.reset()
    assert dev.get_mig_state() is MigState.RUNNING
