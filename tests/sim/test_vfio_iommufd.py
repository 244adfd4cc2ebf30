"""The cdev + iommufd path on the simulated kernel (docs/kernel-contract.md §4.1-§4.4): bind, IOAS,
hardware info, a dirty-tracking HWPT, attach, map, enable, read-and-clear bitmaps (and
NO_CLEAR), teardown; plus the refusals a real host gives (no A/D bits → EOPNOTSUPP, cdev
before bind → EINVAL, cdev vs legacy group → EBUSY)."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.vfio_rig import (  # noqa: F401  (rig_fixture: the rig fixture)
    GROUP,
    MDEV,
    PCI,
    Rig,
    build_rig,
    rig_fixture,
)
from vfiod.errors import KernelError
from vfiod.vfio import Group
from vfiod.vfio.call import U64_MAX
from vfiod.vfio.cdev import CdevDevice
from vfiod.vfio.iommufd import Iommufd

PG = 4096
IOVA = 0x2_0000_0000


@pytest.fixture
def ad_rig(tmp_path: Path) -> Iterator[Rig]:
    """A host whose IOMMU has A/D bits (IOMMU_HW_CAP_DIRTY_TRACKING)."""
    r = build_rig(tmp_path, iommu_dirty_tracking=True)
    yield r
    leaked = r.kernel.open_files()
    r.host.close()
    assert not leaked, f"fds left open: {leaked}"


class Ram:
    def __init__(self, r: Rig, size: int) -> None:
        self.kernel = r.kernel
        self.fd = r.kernel.memfd_create("guest-ram", size)
        self.mm = r.kernel.mmap(self.fd, size)
        self.vaddr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    def close(self) -> None:
        self.mm.close()
        self.kernel.close(self.fd)


def bits(bitmap: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(np.unpackbits(bitmap.view(np.uint8),
                                                          bitorder="little"))]


def test_hwpt_dirty_tracking_end_to_end(ad_rig: Rig) -> None:
    k, paths = ad_rig.kernel, ad_rig.paths
    ram = Ram(ad_rig, 64 * PG)
    iommufd = Iommufd.open(k, paths)
    dev = CdevDevice.open(k, PCI, paths)              # cdev name found through sysfs
    try:
        dev_id = dev.bind(iommufd)
        assert dev.dev_id == dev_id > 0
        assert dev.info().is_pci                      # an ordinary device fd after BIND
        ioas = iommufd.ioas_alloc()
        assert iommufd.ioas_iova_ranges(ioas, capacity=0) == (((0, U64_MAX),), PG)  # EMSGSIZE retry
        hw = iommufd.hw_info(dev_id)
        assert hw.dirty_tracking
        hwpt = iommufd.hwpt_alloc(dev_id, ioas)
        assert dev.attach(hwpt) == hwpt == dev.pt_id
        assert iommufd.ioas_map(ioas, ram.vaddr, 64 * PG, iova=IOVA) == IOVA
        iommufd.set_dirty_tracking(hwpt, True)
        node = ad_rig.host.device(PCI)
        node.dma_write(IOVA + 3 * PG, 2 * PG)
        node.dma_write(IOVA + 40 * PG, 1)
        kept = iommufd.get_dirty_bitmap(hwpt, IOVA, 64 * PG, PG, no_clear=True)
        assert bits(kept) == [3, 4, 40]
        out = np.full(2, np.uint64(0xFF))
        got = iommufd.get_dirty_bitmap(hwpt, IOVA, 64 * PG, PG, out=out)
        assert got is out and bits(out[:1]) == [3, 4, 40] and out[1] == 0xFF
        assert bits(iommufd.get_dirty_bitmap(hwpt, IOVA, 64 * PG, PG)) == []   # cleared
        # a bitmap over a sub-range is indexed from its own iova, at a coarser page size
        node.dma_write(IOVA + 40 * PG, PG)
        assert bits(iommufd.get_dirty_bitmap(hwpt, IOVA + 32 * PG, 32 * PG, 4 * PG)) == [2]
        iommufd.set_dirty_tracking(hwpt, False)
        with pytest.raises(KernelError) as ei:
            iommufd.get_dirty_bitmap(hwpt, IOVA, 64 * PG, PG)
        assert ei.value.errno == errno.EINVAL
        assert ei.value.op.startswith(f"IOMMU_HWPT_GET_DIRTY_BITMAP(hwpt {hwpt}, iova ")
        with pytest.raises(KernelError) as ei:
            iommufd.destroy(hwpt)                     # still attached
        assert ei.value.errno == errno.EBUSY
        dev.detach()
        iommufd.destroy(hwpt)
        assert iommufd.ioas_unmap(ioas, 0, U64_MAX) == 64 * PG
        iommufd.destroy(ioas)
    finally:
        dev.close()
        iommufd.close()
        ram.close()


def test_attach_to_ioas_uses_an_auto_hwpt(rig: Rig) -> None:
    k, paths = rig.kernel, rig.paths
    with Iommufd.open(k, paths) as iommufd, CdevDevice.open(k, PCI, paths) as dev:
        dev_id = dev.bind(iommufd)
        ioas = iommufd.ioas_alloc()
        hwpt = dev.attach(ioas)
        assert hwpt != ioas and dev.pt_id == hwpt
        ram = Ram(rig, 4 * PG)
        try:
            iova = iommufd.ioas_map(ioas, ram.vaddr, 4 * PG)       # kernel picks the IOVA
            assert iova % PG == 0 and iova != 0
            with pytest.raises(KernelError) as ei:
                iommufd.ioas_map(ioas, ram.vaddr, 4 * PG, iova=iova)
            assert ei.value.errno == errno.EEXIST
            assert ei.value.op == f"IOMMU_IOAS_MAP(iova {iova:#x}, length {4 * PG:#x})"
            with pytest.raises(KernelError) as ei:
                iommufd.ioas_unmap(ioas, iova, PG)                  # cuts the area
            assert ei.value.errno == errno.ENOENT
            assert iommufd.ioas_unmap(ioas, iova, 4 * PG) == 4 * PG
        finally:
            ram.close()
        # an auto HWPT has no dirty tracking
        with pytest.raises(KernelError) as ei:
            iommufd.set_dirty_tracking(hwpt, True)
        assert ei.value.errno == errno.EOPNOTSUPP
        assert str(ei.value).startswith(
            f"IOMMU_HWPT_SET_DIRTY_TRACKING(hwpt {hwpt}, ENABLE) on iommufd ")
        assert not iommufd.hw_info(dev_id).dirty_tracking


def test_no_ad_bits_means_eopnotsupp(rig: Rig) -> None:
    k, paths = rig.kernel, rig.paths
    with Iommufd.open(k, paths) as iommufd, CdevDevice.open(k, PCI, paths) as dev:
        dev_id = dev.bind(iommufd)
        ioas = iommufd.ioas_alloc()
        with pytest.raises(KernelError) as ei:
            iommufd.hwpt_alloc(dev_id, ioas)
        assert ei.value.errno == errno.EOPNOTSUPP
        assert ei.value.op == f"IOMMU_HWPT_ALLOC(dev {dev_id}, pt {ioas}, DIRTY_TRACKING)"
        plain = iommufd.hwpt_alloc(dev_id, ioas, dirty_tracking=False)
        assert dev.attach(plain) == plain


def test_cdev_before_bind_is_einval(rig: Rig) -> None:
    with CdevDevice.open(rig.kernel, PCI, rig.paths) as dev:
        with pytest.raises(KernelError) as ei:
            dev.info()
        assert ei.value.errno == errno.EINVAL
        assert str(ei.value).startswith(f"VFIO_DEVICE_GET_INFO on {PCI}: EINVAL")


def test_bind_errors(rig: Rig) -> None:
    k, paths = rig.kernel, rig.paths
    with Iommufd.open(k, paths) as iommufd, CdevDevice.open(k, PCI, paths) as dev:
        dev.bind(iommufd)
        with pytest.raises(KernelError) as ei:
            dev.bind(iommufd)
        assert ei.value.errno == errno.EINVAL and ei.value.op == "VFIO_DEVICE_BIND_IOMMUFD"
        with pytest.raises(KernelError) as ei:
            iommufd.destroy(999)
        assert ei.value.errno == errno.ENOENT and ei.value.op == "IOMMU_DESTROY(999)"


def test_cdev_and_legacy_group_exclude_each_other(rig: Rig) -> None:
    k, paths = rig.kernel, rig.paths
    g = Group.open(k, paths, GROUP[PCI])
    try:
        with pytest.raises(KernelError) as ei:
            CdevDevice.open(k, PCI, paths)
        assert ei.value.errno == errno.EBUSY
        assert "legacy path" in str(ei.value)
    finally:
        g.close()
    with CdevDevice.open(k, PCI, paths):
        with pytest.raises(KernelError) as ei:
            Group.open(k, paths, GROUP[PCI])
        assert ei.value.errno == errno.EBUSY


def test_no_cdev_support(tmp_path: Path) -> None:
    r = build_rig(tmp_path, cdev=False, iommufd=False)
    try:
        with pytest.raises(KernelError) as ei:
            CdevDevice.open(r.kernel, PCI, r.paths)
        assert ei.value.errno == errno.ENODEV and "vfio-dev" in str(ei.value)
        with pytest.raises(KernelError) as ei:
            Iommufd.open(r.kernel, r.paths)
        assert ei.value.errno == errno.ENOENT and "CONFIG_IOMMUFD" in str(ei.value)
    finally:
        r.host.close()


def test_emulated_device_has_no_iommu_info(rig: Rig) -> None:
    k, paths = rig.kernel, rig.paths
    with Iommufd.open(k, paths) as iommufd, CdevDevice.open(k, MDEV, paths) as dev:
        dev_id = dev.bind(iommufd)
        with pytest.raises(KernelError) as ei:
            iommufd.hw_info(dev_id)
        assert ei.value.errno == errno.ENOENT
        assert ei.value.op == f"IOMMU_GET_HW_INFO(dev {dev_id})"
