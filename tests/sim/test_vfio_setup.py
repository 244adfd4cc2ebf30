"""Container → group → device setup on the simulated kernel (docs/kernel-contract.md §3.1-§3.3, §3.6;
errno facts §8): the happy path, every refusal with a clear error that keeps the errno,
and teardown order (devices → groups → container)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import vfiod.abi.vfio as v
from tests.support.vfio_rig import (  # noqa: F401  (rig_fixture: the rig fixture)
    BLOCKED,
    GROUP,
    MDEV,
    PCI,
    PCI2,
    SIBLING,
    Rig,
    open_device,
    rig_fixture,
)
from vfiod.errors import KernelError
from vfiod.vfio import Container, Group, HostPaths


def test_full_setup(rig: Rig) -> None:
    c = Container.open(rig.kernel, rig.paths)
    assert c.check_extension(v.VFIO_TYPE1v2_IOMMU) == 1
    g = Group.open(rig.kernel, rig.paths, GROUP[PCI])
    assert g.status() == (True, False)
    g.set_container(c)
    assert g.status() == (True, True)
    c.set_iommu()
    assert c.iommu_type == v.VFIO_TYPE1v2_IOMMU
    info = c.iommu_info()
    assert info.min_pgsize == 4096 and info.dirty is not None
    assert info.dirty.max_dirty_bitmap_size == 1 << 28
    assert info.iova_ranges == ((0, (1 << 48) - 1),) and info.dma_avail == 65535
    dev = g.get_device(PCI)
    assert dev.info().is_pci and dev.info().can_reset
    assert dev.info().num_regions == v.VFIO_PCI_NUM_REGIONS + 1       # + the vendor region
    assert dev.group is g and g.devices == [dev] and c.groups == [g]
    c.close()
    assert dev.closed and g.closed and c.closed


def test_two_groups_share_a_container(rig: Rig) -> None:
    with Container.open(rig.kernel, rig.paths) as c:
        g1 = Group.open(rig.kernel, rig.paths, GROUP[PCI])
        g1.set_container(c)
        c.set_iommu()
        g2 = Group.open(rig.kernel, rig.paths, GROUP[PCI2])
        g2.set_container(c)                 # attaching after SET_IOMMU is allowed
        d1, d2 = g1.get_device(PCI), g2.get_device(PCI2)
        assert {d1.name, d2.name} == {PCI, PCI2}
    assert d1.closed and d2.closed and g1.closed and g2.closed


def test_close_order_avoids_unset_container_ebusy(rig: Rig) -> None:
    o = open_device(rig, PCI)
    # Detaching while a device fd is open is what the kernel refuses ...
    with pytest.raises(KernelError) as ei:
        o.group.unset_container()
    assert ei.value.errno == errno.EBUSY
    assert str(ei.value).startswith("VFIO_GROUP_UNSET_CONTAINER on group 10: EBUSY")
    assert PCI in str(ei.value)
    # ... so close() goes device → UNSET_CONTAINER → group → container and never hits it.
    start = len(rig.kernel.faults.log)
    o.container.close()
    assert rig.kernel.faults.log[start:] == ["ioctl:VFIO_GROUP_UNSET_CONTAINER@group 10"]
    assert o.device.closed and o.group.closed
    # the group is free again: a new owner can open it
    Group.open(rig.kernel, rig.paths, GROUP[PCI]).close()


def test_close_finishes_even_if_a_step_fails(rig: Rig) -> None:
    o = open_device(rig, PCI)
    rig.kernel.faults.inject("ioctl:VFIO_GROUP_UNSET_CONTAINER", errno.EIO)
    with pytest.raises(KernelError) as ei:
        o.container.close()
    assert ei.value.errno == errno.EIO and "VFIO_GROUP_UNSET_CONTAINER" in str(ei.value)
    assert o.device.closed and o.group.closed and o.container.closed
    o.container.close()                     # idempotent


def test_second_group_open_is_ebusy(rig: Rig) -> None:
    g = Group.open(rig.kernel, rig.paths, GROUP[PCI])
    try:
        with pytest.raises(KernelError) as ei:
            Group.open(rig.kernel, rig.paths, GROUP[PCI])
        e = ei.value
        assert e.errno == errno.EBUSY
        assert str(e) == (f"open({rig.paths.dev_root}/vfio/10) on group 10: EBUSY "
                          "(group 10 is already open by another process (a VMM?))")
    finally:
        g.close()


def test_non_viable_group_names_the_culprit(rig: Rig) -> None:
    with pytest.raises(KernelError) as ei:
        Group.open(rig.kernel, rig.paths, GROUP[BLOCKED])
    e = ei.value
    assert e.errno == errno.EPERM and e.op == "VFIO_GROUP_GET_STATUS"
    assert f"group 11 is not viable: {SIBLING} is bound to host driver ixgbe" in str(e)
    # the failed open released the group fd
    assert not rig.kernel.open_files()


def test_group_without_dev_node(rig: Rig) -> None:
    with pytest.raises(KernelError) as ei:
        Group.open(rig.kernel, rig.paths, 12)
    assert ei.value.errno == errno.ENOENT
    assert "bound to a VFIO driver?" in str(ei.value)


def test_set_iommu_needs_a_group_and_only_once(rig: Rig) -> None:
    with Container.open(rig.kernel, rig.paths) as c:
        with pytest.raises(KernelError) as ei:
            c.set_iommu()
        assert ei.value.errno == errno.EINVAL
        assert "VFIO_SET_IOMMU(VFIO_TYPE1v2_IOMMU)" in str(ei.value)
        g = Group.open(rig.kernel, rig.paths, GROUP[PCI])
        g.set_container(c)
        c.set_iommu()
        with pytest.raises(KernelError, match="already set") as ei:
            c.set_iommu()
        assert ei.value.errno == errno.EINVAL


def test_kernel_refuses_unknown_iommu_type(rig: Rig) -> None:
    with Container.open(rig.kernel, rig.paths) as c:
        Group.open(rig.kernel, rig.paths, GROUP[PCI]).set_container(c)
        with pytest.raises(KernelError) as ei:
            c.set_iommu(v.VFIO_SPAPR_TCE_IOMMU)
        assert ei.value.errno == errno.ENODEV
        assert ei.value.op == "VFIO_SET_IOMMU(2)" and ei.value.target.startswith("container")
        assert c.iommu_type is None


def test_get_device_errors(rig: Rig) -> None:
    with Container.open(rig.kernel, rig.paths) as c:
        g = Group.open(rig.kernel, rig.paths, GROUP[PCI])
        with pytest.raises(KernelError, match="set a container") as ei:
            g.get_device(PCI)
        assert ei.value.errno == errno.EINVAL
        g.set_container(c)
        with pytest.raises(KernelError) as ei:         # no IOMMU yet: the kernel says so
            g.get_device(PCI)
        assert ei.value.errno == errno.EINVAL
        c.set_iommu()
        with pytest.raises(KernelError) as ei:
            g.get_device(MDEV)
        assert ei.value.errno == errno.ENODEV
        assert str(ei.value) == (f"VFIO_GROUP_GET_DEVICE_FD({MDEV}) on group 10: ENODEV "
                                 f"({MDEV} is not a device of group 10)")


def test_set_container_twice_is_refused(rig: Rig) -> None:
    with Container.open(rig.kernel, rig.paths) as c1, Container.open(rig.kernel, rig.paths) as c2:
        g = Group.open(rig.kernel, rig.paths, GROUP[PCI])
        g.set_container(c1)
        with pytest.raises(KernelError, match="already attached") as ei:
            g.set_container(c2)
        assert ei.value.errno == errno.EINVAL
        assert g.container is c1 and c2.groups == []


def test_container_open_checks_api_version(rig: Rig) -> None:
    rig.kernel.faults.inject("ioctl:VFIO_GET_API_VERSION", errno.EIO)
    with pytest.raises(KernelError) as ei:
        Container.open(rig.kernel, rig.paths)
    assert ei.value.errno == errno.EIO and ei.value.op == "VFIO_GET_API_VERSION"
    assert not rig.kernel.open_files()          # the container fd was closed again


class _WrongApi:
    """A kernel whose container answers API version 1 or lacks type1v2."""

    def __init__(self, inner: object, version: int, type1v2: int) -> None:
        self.inner, self.version, self.type1v2 = inner, version, type1v2

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def ioctl(self, fd: int, request: int, arg: object = 0, label: str = "",
              target: str = "") -> int:
        if request == v.VFIO_GET_API_VERSION:
            return self.version
        if request == v.VFIO_CHECK_EXTENSION and arg == v.VFIO_TYPE1v2_IOMMU:
            return self.type1v2
        return self.inner.ioctl(fd, request, arg, label, target)  # type: ignore[attr-defined]


@pytest.mark.parametrize("version,type1v2,err,text", [
    (1, 1, errno.EPROTONOSUPPORT, "kernel speaks VFIO API 1, vfiod needs 0"),
    (0, 0, errno.ENODEV, "no type1v2 IOMMU"),
])
def test_container_refuses_wrong_api(rig: Rig, version: int, type1v2: int, err: int,
                                     text: str) -> None:
    k = _WrongApi(rig.kernel, version, type1v2)
    with pytest.raises(KernelError) as ei:
        Container.open(k, rig.paths)  # type: ignore[arg-type]
    assert ei.value.errno == err and text in str(ei.value)
    assert not rig.kernel.open_files()


def test_missing_container_node(rig: Rig, tmp_path: Path) -> None:
    # no /dev/vfio/vfio at all: the vfio module is not loaded
    paths = HostPaths(sysfs_root=rig.paths.sysfs_root, dev_root=str(tmp_path / "empty-dev"))
    with pytest.raises(KernelError) as ei:
        Container.open(rig.kernel, paths)
    assert ei.value.errno == errno.ENOENT
    assert str(ei.value).startswith(f"open({paths.vfio_container}) on VFIO container: ENOENT")


def test_adopted_fds(rig: Rig) -> None:
    """A VMM hands over its container fd (SCM_RIGHTS); vfiod wraps it without reopening."""
    o = open_device(rig, PCI)
    adopted = Container.adopt(rig.kernel, o.container.fd, iommu_type=v.VFIO_TYPE1v2_IOMMU)
    assert adopted.iommu_info().dirty is not None
    assert adopted.name == f"container fd {o.container.fd}"
    o.container.close()
