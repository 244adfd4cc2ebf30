"""The guest is the rig the other guest tests assume (docs/testing.md "The real-kernel tier"):
modules loaded, device nodes present, the emulated IOMMU active, the mtty mdev and the edu
device usable through VFIO. Each check fails naming what is missing."""

from __future__ import annotations

import os
import stat

import pytest

from tests.kernel.guest import rig
from vfiod.kernel.linux import LinuxKernel
from vfiod.vfio import HostPaths, discover_device

#: Modules init.sh loads for VFIO (9p/overlay are proven by the suite running at all).
VFIO_MODULES = ("vfio", "vfio_iommu_type1", "mdev", "vfio_pci_core", "vfio_pci", "mtty")


@pytest.mark.parametrize("module", VFIO_MODULES)
def test_module_loaded(module: str) -> None:
    rig.require_module(module)


def test_no_module_failed_to_load() -> None:
    assert rig.insmod_failures() == "", "init.sh could not load:\n" + rig.insmod_failures()


def test_container_node_exists(vfio_ready: None) -> None:
    st = os.stat(rig.DEV / "vfio" / "vfio")
    assert stat.S_ISCHR(st.st_mode)


def test_intel_iommu_active() -> None:
    iommus = sorted(os.listdir(rig.SYS / "class" / "iommu"))
    assert any(n.startswith("dmar") for n in iommus), (
        f"no DMAR unit in /sys/class/iommu ({iommus}): QEMU needs -device intel-iommu and "
        "the kernel intel_iommu=on")


def test_mtty_parent_offers_both_types() -> None:
    rig.require_module("mtty")
    types = sorted(p.name for p in (rig.MTTY_PARENT / "mdev_supported_types").iterdir())
    assert types == ["mtty-1", "mtty-2"]


def test_mtty_mdev_is_a_vfio_device(kernel: LinuxKernel, paths: HostPaths,
                                    mtty_uuid: str) -> None:
    found = discover_device(kernel, mtty_uuid, paths)
    assert found.kind == "mdev"
    assert found.mdev_type == "mtty-2"
    assert found.vfio_capable, found.reason
    assert found.group is not None
    rig.require_char_device(rig.DEV / "vfio" / str(found.group),
                            f"the group node of mdev {mtty_uuid}")


def test_edu_bound_to_vfio_pci(kernel: LinuxKernel, paths: HostPaths, edu: str) -> None:
    found = discover_device(kernel, edu, paths)
    assert (found.kind, found.driver) == ("pci", "vfio-pci")
    assert (found.vendor, found.device) == (rig.EDU_VENDOR, rig.EDU_DEVICE)
    assert found.vfio_capable, found.reason
    assert found.group is not None
    rig.require_char_device(rig.DEV / "vfio" / str(found.group),
                            f"the group node of {edu}")
