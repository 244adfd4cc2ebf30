"""``Device`` on the simulated kernel: region info with the two-call pattern and its
capabilities, region access and mmap, IRQ info, reset (docs/kernel-contract.md §3.3-§3.5), and the
``VFIO_DEVICE_FEATURE`` primitives the migration layer builds on (§6.1-§6.3, §6.8-§6.9,
§7), each failure named ``VFIO_DEVICE_FEATURE(...) on <device>: <errno>``."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import numpy as np
import pytest

import vfiod.abi.vfio as v
from tests.support.vfio_rig import (  # noqa: F401  (rig_fixture: the rig fixture)
    MDEV,
    PCI,
    PCI2,
    SPARSE,
    VENDOR_REGION,
    VENDOR_SUBTYPE,
    VENDOR_TYPE,
    LogFeatures,
    MigFeatures,
    Opened,
    Rig,
    VendorRegion,
    open_device,
    rig_fixture,
)
from vfiod.abi.vfio import MigState
from vfiod.errors import KernelError


@pytest.fixture
def pci(rig: Rig) -> Iterator[Opened]:
    o = open_device(rig, PCI)
    yield o
    o.container.close()


@pytest.fixture
def plain(rig: Rig) -> Iterator[Opened]:
    """A vfio-pci device without migration or logging."""
    o = open_device(rig, PCI2)
    yield o
    o.container.close()


def _part(rig: Rig, name: str, kind: type) -> object:
    parts = rig.parts(name)
    return next(p for p in [*parts.features, *parts.regions] if isinstance(p, kind))


# -- regions ------------------------------------------------------------------------------

def test_region_info_two_calls_with_sparse_and_type_caps(pci: Opened, rig: Rig) -> None:
    dev = pci.device
    start = len(rig.kernel.faults.log)
    r = dev.region_info(VENDOR_REGION)
    assert rig.kernel.faults.log[start:] == ["ioctl:VFIO_DEVICE_GET_REGION_INFO@" + PCI] * 2
    assert (r.type, r.subtype) == (VENDOR_TYPE, VENDOR_SUBTYPE)
    assert r.sparse == SPARSE and r.mmap_areas() == SPARSE
    assert r.cap_ids == (v.VFIO_REGION_INFO_CAP_SPARSE_MMAP, v.VFIO_REGION_INFO_CAP_TYPE)
    assert r.size == 0x3000 and r.readable and r.writable and r.mmappable
    assert r.offset == VENDOR_REGION << 40          # whatever the kernel says, used verbatim


def test_fixed_regions(pci: Opened) -> None:
    dev = pci.device
    bar0 = dev.region_info(v.VFIO_PCI_BAR0_REGION_INDEX)
    assert bar0.size == 1 << 20 and bar0.mmappable and bar0.msix_mappable
    assert bar0.sparse is None and bar0.mmap_areas() == ((0, 1 << 20),)
    assert dev.region_info(v.VFIO_PCI_ROM_REGION_INDEX).size == 0          # not present
    cfg = dev.region_info(v.VFIO_PCI_CONFIG_REGION_INDEX)
    assert cfg.size == 4096 and not cfg.mmappable and cfg.mmap_areas() == ()
    assert [r.index for r in dev.regions()] == list(range(10))
    with pytest.raises(KernelError) as ei:
        dev.region_info(10)
    assert ei.value.errno == errno.EINVAL
    assert str(ei.value).startswith(f"VFIO_DEVICE_GET_REGION_INFO(index 10) on {PCI}: EINVAL")


def test_find_region_by_type(pci: Opened) -> None:
    assert pci.device.find_region(VENDOR_TYPE, VENDOR_SUBTYPE).index == VENDOR_REGION  # type: ignore[union-attr]
    assert pci.device.find_region(3, 1) is None           # no v1 migration region here


def test_region_read_write(pci: Opened, rig: Rig) -> None:
    dev = pci.device
    vendor, device = struct.unpack("<HH", dev.read_region(v.VFIO_PCI_CONFIG_REGION_INDEX, 0, 4))
    assert (vendor, device) == (0x15B3, 0x101E)
    assert dev.write_region(VENDOR_REGION, 0x1ff0, b"hello") == 5
    region = _part(rig, PCI, VendorRegion)
    assert bytes(region.data[0x1ff0:0x1ff5]) == b"hello"  # type: ignore[attr-defined]
    assert dev.read_region(VENDOR_REGION, 0x1ff0, 5) == b"hello"
    with pytest.raises(ValueError, match="outside region 9"):
        dev.read_region(VENDOR_REGION, 0x2ffe, 4)
    with pytest.raises(ValueError, match="outside region 7"):
        dev.write_region(v.VFIO_PCI_CONFIG_REGION_INDEX, -1, b"x")


def test_region_mmap_respects_sparse_areas(pci: Opened) -> None:
    dev = pci.device
    m = dev.mmap_region(VENDOR_REGION, 0x2000, 0x1000)
    assert len(m) == 0x1000
    m.close()
    with pytest.raises(ValueError, match="not inside an mmappable area"):
        dev.mmap_region(VENDOR_REGION, 0x1000, 0x1000)       # the sparse hole
    with pytest.raises(ValueError, match="not inside an mmappable area"):
        dev.mmap_region(VENDOR_REGION, 0, 0x2000)            # spans the hole
    with pytest.raises(ValueError, match="not inside an mmappable area"):
        dev.mmap_region(v.VFIO_PCI_CONFIG_REGION_INDEX, 0, 4096)
    bar = dev.mmap_region(v.VFIO_PCI_BAR0_REGION_INDEX, 0, 4096)
    bar[0:4] = b"\x01\x02\x03\x04"        # device memory: reads through pread see it
    assert dev.read_region(v.VFIO_PCI_BAR0_REGION_INDEX, 0, 4) == b"\x01\x02\x03\x04"
    bar.close()


def test_kernel_mmap_error_is_named(pci: Opened) -> None:
    with pytest.raises(KernelError) as ei:
        pci.device.mmap_region(v.VFIO_PCI_BAR0_REGION_INDEX, 100, 4096)   # not page aligned
    assert ei.value.errno == errno.EINVAL
    assert str(ei.value).startswith(f"mmap(region 0 +0x64, 0x1000) on {PCI}: EINVAL")


def test_irq_info_and_reset(pci: Opened, rig: Rig) -> None:
    dev = pci.device
    msix = dev.irq_info(v.VFIO_PCI_MSIX_IRQ_INDEX)
    assert (msix.count, bool(msix.flags & v.VFIO_IRQ_INFO_EVENTFD)) == (8, True)
    intx = dev.irq_info(v.VFIO_PCI_INTX_IRQ_INDEX)
    assert intx.flags & v.VFIO_IRQ_INFO_MASKABLE
    with pytest.raises(KernelError) as ei:
        dev.irq_info(9)
    assert ei.value.errno == errno.EINVAL and "VFIO_DEVICE_GET_IRQ_INFO(index 9)" in str(ei.value)
    dev.write_region(v.VFIO_PCI_CONFIG_REGION_INDEX, 0x40, b"\xaa")
    dev.reset()
    assert dev.read_region(v.VFIO_PCI_CONFIG_REGION_INDEX, 0x40, 1) == b"\x00"


def test_reset_fault_is_named(pci: Opened, rig: Rig) -> None:
    rig.kernel.faults.inject("ioctl:VFIO_DEVICE_RESET", errno.EIO)
    with pytest.raises(KernelError) as ei:
        pci.device.reset()
    assert str(ei.value).startswith(f"VFIO_DEVICE_RESET on {PCI}: EIO")


# -- features -----------------------------------------------------------------------------

def test_feature_probe_answers(pci: Opened, plain: Opened) -> None:
    dev = pci.device
    assert dev.feature_probe(v.VFIO_DEVICE_FEATURE_MIGRATION, v.VFIO_DEVICE_FEATURE_GET)
    assert not dev.feature_probe(v.VFIO_DEVICE_FEATURE_MIGRATION,
                                 v.VFIO_DEVICE_FEATURE_SET)          # direction: EINVAL
    assert dev.feature_probe(v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                             v.VFIO_DEVICE_FEATURE_GET | v.VFIO_DEVICE_FEATURE_SET)
    assert dev.dma_logging_probe()
    assert not plain.device.dma_logging_probe()                      # ENOTTY
    assert not plain.device.feature_probe(v.VFIO_DEVICE_FEATURE_MIGRATION,
                                          v.VFIO_DEVICE_FEATURE_GET)


def test_feature_probe_other_errno_raises(pci: Opened, rig: Rig) -> None:
    rig.kernel.faults.inject("ioctl:VFIO_DEVICE_FEATURE", errno.EIO)
    with pytest.raises(KernelError) as ei:
        pci.device.feature_probe(v.VFIO_DEVICE_FEATURE_MIGRATION, v.VFIO_DEVICE_FEATURE_GET)
    assert str(ei.value).startswith(
        f"VFIO_DEVICE_FEATURE(PROBE GET MIGRATION) on {PCI}: EIO")


def test_migration_primitives(pci: Opened, rig: Rig) -> None:
    dev = pci.device
    assert dev.mig_flags() == v.VFIO_MIGRATION_STOP_COPY | v.VFIO_MIGRATION_PRE_COPY
    assert dev.mig_data_size() == 12345
    assert dev.get_mig_state() is MigState.RUNNING
    fd = dev.set_mig_state(MigState.PRE_COPY)
    assert fd >= 0
    try:
        assert dev.get_mig_state() is MigState.PRE_COPY
        assert dev.precopy_info(fd) == (13, 3)
        buf = bytearray(7)
        assert dev.data_readinto(fd, buf) == 7 and bytes(buf) == b"precopy"
        assert dev.data_read(fd, 100) == b"-bytes"
        assert dev.precopy_info(fd) == (0, 3)
    finally:
        dev.data_close(fd)
    assert dev.set_mig_state(MigState.STOP) == -1
    mig = _part(rig, PCI, MigFeatures)
    assert mig.sets == [MigState.PRE_COPY, MigState.STOP]  # type: ignore[attr-defined]


def test_set_mig_state_failure_keeps_errno_and_names_the_state(pci: Opened) -> None:
    with pytest.raises(KernelError) as ei:
        pci.device.set_mig_state(MigState.ERROR)
    assert ei.value.errno == errno.EINVAL
    assert str(ei.value).startswith(
        f"VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE ERROR) on {PCI}: EINVAL")


def test_injected_transition_failure(pci: Opened, rig: Rig) -> None:
    rig.kernel.faults.inject(f"feature:MIG_DEVICE_STATE@{PCI}", errno.EIO)
    with pytest.raises(KernelError) as ei:
        pci.device.set_mig_state(MigState.STOP_COPY)
    assert ei.value.errno == errno.EIO
    assert ei.value.op == "VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE STOP_COPY)"
    assert ei.value.target == PCI


def test_not_migratable_device(plain: Opened) -> None:
    assert plain.device.mig_flags() is None
    with pytest.raises(KernelError) as ei:
        plain.device.get_mig_state()
    assert ei.value.errno == errno.ENOTTY
    assert str(ei.value).startswith(
        f"VFIO_DEVICE_FEATURE(GET MIG_DEVICE_STATE) on {PCI2}: ENOTTY")


def test_data_fd_errors_are_named(pci: Opened) -> None:
    with pytest.raises(KernelError) as ei:
        pci.device.data_read(pci.device.fd, 16)          # a device fd is not a data fd
    assert ei.value.target == PCI and ei.value.op == "read(migration data fd)"
    with pytest.raises(KernelError) as ei:
        pci.device.precopy_info(pci.group.fd)             # a group fd has no PRECOPY_INFO
    assert ei.value.errno == errno.ENOTTY
    assert str(ei.value).startswith(f"VFIO_MIG_GET_PRECOPY_INFO on {PCI}: ENOTTY")


def test_generic_feature_get_set(pci: Opened) -> None:
    raw = pci.device.feature_get(v.VFIO_DEVICE_FEATURE_MIGRATION, 8)
    assert struct.unpack("=Q", raw)[0] == v.VFIO_MIGRATION_STOP_COPY | v.VFIO_MIGRATION_PRE_COPY
    out = pci.device.feature_set(v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                                 struct.pack("=Ii", MigState.STOP, -1), " STOP")
    assert struct.unpack("=Ii", out) == (MigState.STOP, -1)
    with pytest.raises(KernelError) as ei:         # a feature this device lacks
        pci.device.feature_get(v.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY, 0)
    assert ei.value.errno == errno.ENOTTY
    assert ei.value.op == "VFIO_DEVICE_FEATURE(GET LOW_POWER_ENTRY)"
    with pytest.raises(ValueError, match="outside 0..0xffff"):
        pci.device.feature_get(0x10000, 8)


# -- device DMA logging -------------------------------------------------------------------

def test_dma_logging_start_report_stop(pci: Opened, rig: Rig) -> None:
    dev = pci.device
    log = _part(rig, PCI, LogFeatures)
    ranges = [(0x1000_0000, 0x20_0000), (0x4000_0000, 0x10_0000)]
    assert dev.dma_logging_start(ranges, 4096) == 0x10000     # the driver's granule
    assert log.started == (4096, ranges)  # type: ignore[attr-defined]
    log.report_bits = [0, 5, 64, 99]  # type: ignore[attr-defined]
    out = np.full(4, np.uint64(7))
    got = dev.dma_logging_report(0x1000_0000, 100 * 4096, 4096, out=out)
    assert got is out and out[3] == 7
    flat = np.unpackbits(out[:2].view(np.uint8), bitorder="little")
    assert list(np.flatnonzero(flat)) == [0, 5, 64, 99]
    assert log.reports == [(0x1000_0000, 100 * 4096, 4096)]  # type: ignore[attr-defined]
    dev.dma_logging_stop()
    assert log.started is None  # type: ignore[attr-defined]


def test_dma_logging_errors(pci: Opened, plain: Opened, rig: Rig) -> None:
    dev = pci.device
    with pytest.raises(ValueError, match="at least one range"):
        dev.dma_logging_start([], 4096)
    with pytest.raises(KernelError) as ei:
        dev.dma_logging_start([(i << 24, 4096) for i in range(5)], 4096)
    assert ei.value.errno == errno.E2BIG
    assert str(ei.value).startswith(
        f"VFIO_DEVICE_FEATURE(SET DMA_LOGGING_START) on {PCI}: E2BIG")
    with pytest.raises(KernelError) as ei:
        dev.dma_logging_report(0, 4096, 4096)
    assert ei.value.errno == errno.EINVAL           # no session
    assert ei.value.op == "VFIO_DEVICE_FEATURE(GET DMA_LOGGING_REPORT)"
    with pytest.raises(KernelError) as ei:
        plain.device.dma_logging_start([(0, 4096)], 4096)
    assert ei.value.errno == errno.ENOTTY and ei.value.target == PCI2
    with pytest.raises(ValueError, match="page_size"):
        dev.dma_logging_report(0, 4096, 0)


def test_mdev_device_over_its_own_group(rig: Rig) -> None:
    o = open_device(rig, MDEV)
    try:
        assert o.device.info().num_regions == v.VFIO_PCI_NUM_REGIONS
        assert o.device.region_info(v.VFIO_PCI_BAR0_REGION_INDEX).size == 8
        assert not o.device.region_info(v.VFIO_PCI_BAR0_REGION_INDEX).mmappable
    finally:
        o.container.close()
