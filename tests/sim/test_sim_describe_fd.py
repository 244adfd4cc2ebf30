"""``KernelOps.describe_fd`` and ``dup`` (docs/architecture.md §8.1: checking an fd a VMM
handed over): real fds are described by the real kernel, through the simulator too;
a simulated VFIO file is described as the real kernel describes its kind (fdfacts.py),
and a dup of it is the same open file."""

from __future__ import annotations

import errno
import os

import pytest

from vfiod.errors import KernelError
from vfiod.kernel.linux import LinuxKernel
from vfiod.kernel.sim.host import SimHost
from vfiod.kernel.sim.interfaces import DeviceSpec
from vfiod.kernel.sim.kernel import SimKernel
from vfiod.vfio import Container, Group, HostPaths
from vfiod.vfio.cdev import CdevDevice
from vfiod.vfio.handover import classify_fd
from vfiod.vfio.iommufd import Iommufd


@pytest.mark.parametrize("kernel", [LinuxKernel(), SimKernel()], ids=["linux", "sim"])
def test_a_memfd_a_pipe_and_a_read_only_file(kernel, tmp_path) -> None:
    memfd = os.memfd_create("describe")
    os.ftruncate(memfd, 8192)
    rd, wr = os.pipe()
    (tmp_path / "f").write_bytes(b"x" * 100)
    ro = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        m = kernel.describe_fd(memfd)
        assert (m.regular, m.kind, m.size, m.writable) == (True, "regular", 8192, True)
        copy = kernel.dup(memfd)
        try:
            c = kernel.describe_fd(copy)
            assert copy != memfd and (c.device, c.inode) == (m.device, m.inode)
        finally:
            kernel.close(copy)
        p = kernel.describe_fd(rd)
        assert (p.regular, p.kind) == (False, "fifo")
        r = kernel.describe_fd(ro)
        assert (r.regular, r.size, r.writable) == (True, 100, False)
        kernel.close(rd)
        with pytest.raises(KernelError) as e:
            kernel.describe_fd(rd)
        assert e.value.errno == errno.EBADF and f"fstat(fd {rd})" in str(e.value)
    finally:
        for fd in (memfd, wr, ro):
            os.close(fd)


def test_simulated_vfio_files_describe_as_the_kernel_s_and_dups_share_one_file(
        tmp_path) -> None:
    host = SimHost.build(tmp_path, [[DeviceSpec("0000:3b:00.1", migration="none")]])
    k, paths = host.kernel, HostPaths(host.sysfs_root, host.dev_root)
    number = host.group_of("0000:3b:00.1")
    container = Container.open(k, paths)
    group = Group.open(k, paths, number)
    try:
        group.set_container(container)
        container.set_iommu()
        device = group.get_device("0000:3b:00.1")
        c, g, d = (k.describe_fd(x.fd) for x in (container, group, device))
        assert (c.kind, c.rdev, c.link, c.regular) == ("char", (10, 196), "/dev/vfio/vfio",
                                                       False)
        assert (g.kind, g.link) == ("char", f"/dev/vfio/{number}") and g.rdev is not None
        # /sys/dev/char/MAJ:MIN names the group, as on the real kernel
        link = k.readlink(f"{host.sysfs_root}/dev/char/{g.rdev[0]}:{g.rdev[1]}")
        assert link.endswith(f"devices/virtual/vfio/{number}"), link
        assert (d.kind, d.rdev, d.link) == ("unknown", None, "anon_inode:[vfio-device]")
        # a dup is the same open file: closing it leaves the first fd working
        copy = k.dup(device.fd)
        assert k.describe_fd(copy).inode == d.inode
        k.close(copy)
        assert device.info().num_regions > 0
        assert not k.file_of(device.fd).closed
    finally:
        container.close()
        host.close()
    assert k.open_files() == {}


def test_a_cdev_and_an_iommufd_are_told_by_their_sysfs_links(tmp_path) -> None:
    """``classify_fd`` (vfiod/vfio/handover.py) on the simulator's cdev and iommufd, and
    on a memfd: what a refusal of a wrong fd names."""
    host = SimHost.build(tmp_path, [[DeviceSpec("0000:3b:00.1", migration="none")]])
    k, paths = host.kernel, HostPaths(host.sysfs_root, host.dev_root)
    cdev = CdevDevice.open(k, "0000:3b:00.1", paths)
    iommu = Iommufd.open(k, paths)
    memfd = os.memfd_create("classify")
    try:
        kinds = [classify_fd(k, paths, fd) for fd in (cdev.fd, iommu.fd, memfd)]
        assert [(c.kind, c.what) for c in kinds] == [
            ("cdev", "the VFIO cdev vfio0 of 0000:3b:00.1"),
            ("iommufd", "an iommufd (/dev/iommu)"),
            ("other", "a regular file")]
    finally:
        os.close(memfd)
        cdev.close()
        iommu.close()
        host.close()
