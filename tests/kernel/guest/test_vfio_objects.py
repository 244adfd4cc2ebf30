"""Container → group → device against real /dev/vfio, through vfiod.vfio objects
(docs/kernel-contract.md §3.1-§3.4, §3.6; errno facts from §8)."""

from __future__ import annotations

import errno
import struct

import pytest

import vfiod.abi.vfio as v
from tests.kernel.guest import rig
from tests.kernel.guest.conftest import Opened
from vfiod.errors import KernelError
from vfiod.kernel.linux import LinuxKernel
from vfiod.vfio import Container, Group, HostPaths, discover_device


def test_container_speaks_api_0_with_type1v2(kernel: LinuxKernel, paths: HostPaths,
                                             vfio_ready: None) -> None:
    # Container.open itself checks VFIO_GET_API_VERSION == 0 and TYPE1v2.
    with Container.open(kernel, paths) as c:
        assert c.check_extension(v.VFIO_TYPE1v2_IOMMU) > 0
        assert c.check_extension(v.VFIO_TYPE1_IOMMU) > 0
        # Debian builds without CONFIG_VFIO_NOIOMMU
        assert c.check_extension(v.VFIO_NOIOMMU_IOMMU) == 0


def test_mtty_group_attach_and_device(kernel: LinuxKernel, paths: HostPaths,
                                      mtty_uuid: str) -> None:
    group_no = discover_device(kernel, mtty_uuid, paths).group
    assert group_no is not None
    with Container.open(kernel, paths) as c:
        g = Group.open(kernel, paths, group_no)
        assert g.status() == (True, False)
        g.set_container(c)
        assert g.status() == (True, True)
        c.set_iommu(v.VFIO_TYPE1v2_IOMMU)
        dev = g.get_device(mtty_uuid)
        info = dev.info()
        assert info.is_pci
        assert (info.num_regions, info.num_irqs) == (v.VFIO_PCI_NUM_REGIONS, v.VFIO_PCI_NUM_IRQS)


def test_mtty_config_space_region(mtty: Opened) -> None:
    cfg = mtty.device.region_info(v.VFIO_PCI_CONFIG_REGION_INDEX)
    assert cfg.readable and cfg.writable
    assert cfg.size == 0xFF          # mtty's MTTY_CONFIG_SPACE_SIZE
    vendor, device = struct.unpack("<HH", mtty.device.read_region(
        v.VFIO_PCI_CONFIG_REGION_INDEX, 0, 4))
    assert (vendor, device) == (rig.MTTY_VENDOR, rig.MTTY_DEVICE)
    # two ports: BAR0 and BAR1 are 8-byte UART register windows
    assert mtty.device.region_info(v.VFIO_PCI_BAR0_REGION_INDEX).size == 8
    assert mtty.device.region_info(v.VFIO_PCI_BAR1_REGION_INDEX).size == 8


def test_mtty_container_iommu_info(mtty: Opened) -> None:
    info = mtty.container.iommu_info()
    assert info.min_pgsize == 4096
    assert info.dirty is not None, "type1 offers no dirty-tracking capability"
    assert info.dirty.pgsize == 4096
    assert info.dirty.max_dirty_bitmap_size == 1 << 28


def test_edu_device_and_iommu(edu_dev: Opened) -> None:
    info = edu_dev.device.info()
    assert info.is_pci
    vendor, device = struct.unpack("<HH", edu_dev.device.read_region(
        v.VFIO_PCI_CONFIG_REGION_INDEX, 0, 4))
    assert (vendor, device) == (rig.EDU_VENDOR, rig.EDU_DEVICE)
    bar0 = edu_dev.device.region_info(v.VFIO_PCI_BAR0_REGION_INDEX)
    assert bar0.size == 1 << 20 and bar0.mmappable
    iommu = edu_dev.container.iommu_info()
    assert iommu.dirty is not None
    # a real (emulated) IOMMU reports its usable IOVA ranges; the MSI window is a hole
    assert iommu.iova_ranges, "no IOVA range capability on an IOMMU-backed container"
    assert not any(s <= 0xFEE00000 <= e for s, e in iommu.iova_ranges)


def test_edu_is_not_migratable(edu_dev: Opened) -> None:
    assert edu_dev.device.mig_flags() is None


def test_group_opened_twice_is_busy(kernel: LinuxKernel, paths: HostPaths,
                                    mtty: Opened) -> None:
    with pytest.raises(KernelError) as ei:
        Group.open(kernel, paths, mtty.group.number)
    assert ei.value.errno == errno.EBUSY
    assert "already open" in str(ei.value)


def test_unknown_device_name_is_enodev(mtty: Opened) -> None:
    with pytest.raises(KernelError) as ei:
        mtty.group.get_device("00000000-0000-0000-0000-000000000000")
    assert ei.value.errno == errno.ENODEV
    assert "VFIO_GROUP_GET_DEVICE_FD" in str(ei.value)
