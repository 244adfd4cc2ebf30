"""SimHost builds a sysfs tree shaped like the kernel's and /dev nodes served by SimKernel;
SimKernel's fd table answers like the kernel's (docs/kernel-contract.md §3.1, §4.1)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vfiod.errors import KernelError
from vfiod.kernel.ops import KernelOps
from vfiod.kernel.sim import SIM_FD_BASE, HostDevice, SimHost, SimHostConfig
from vfiod.kernel.sim.base import SimFile
from vfiod.kernel.sim.interfaces import DeviceParts, DeviceSpec

UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"


def no_parts(spec: DeviceSpec, fds: object) -> DeviceParts:
    return DeviceParts()


@pytest.fixture
def host(tmp_path: Path):
    h = SimHost.build(tmp_path, [
        [DeviceSpec("0000:3b:00.1", driver="mlx5_vfio_pci")],                 # group 10
        [DeviceSpec(UUID, kind="mdev", extra={"mdev_type": "mtty-2",
                                              "mdev_type_name": "Dual port serial"})],
        [HostDevice("0000:3b:00.0", driver="mlx5_core")],                      # group 12
        [DeviceSpec("0000:5e:00.0"), HostDevice("0000:5e:00.1", driver="ixgbe")],
        [DeviceSpec("0000:5f:00.0"), HostDevice("0000:5f:00.1", driver=None)],
    ], build_parts=no_parts)
    yield h
    h.close()


def test_pci_device_links_point_where_the_kernel_points(host: SimHost) -> None:
    sys = Path(host.sysfs_root)
    dev = sys / "bus/pci/devices/0000:3b:00.1"
    assert dev.is_symlink()
    real = dev.resolve()
    assert real == (sys / "devices/pci0000:3b/0000:3b:00.1").resolve()
    assert os.readlink(real / "iommu_group") == "../../../kernel/iommu_groups/10"
    assert os.path.basename(os.readlink(real / "driver")) == "mlx5_vfio_pci"
    assert (real / "driver").resolve() == (sys / "bus/pci/drivers/mlx5_vfio_pci").resolve()
    assert (real / "vendor").read_text() == "0x15b3\n"
    assert (real / "device").read_text() == "0x101e\n"
    members = os.listdir(sys / "kernel/iommu_groups/10/devices")
    assert members == ["0000:3b:00.1"]
    assert (sys / "kernel/iommu_groups/10/devices/0000:3b:00.1").resolve() == real
    assert os.listdir(real / "vfio-dev") == ["vfio0"]


def test_mdev_tree(host: SimHost) -> None:
    sys = Path(host.sysfs_root)
    link = sys / "bus/mdev/devices" / UUID
    real = link.resolve()
    assert real.parent == (sys / "devices/virtual/mtty/mtty").resolve()
    assert os.path.basename(os.readlink(real / "mdev_type")) == "mtty-2"
    assert os.path.basename(os.readlink(real / "driver")) == "mtty"
    assert os.readlink(real / "iommu_group").endswith("kernel/iommu_groups/11")
    types = sys / "class/mdev_bus/mtty/mdev_supported_types/mtty-2"
    assert (types / "name").read_text() == "Dual port serial\n"
    assert (types / "device_api").read_text() == "vfio-pci\n"
    assert int((types / "available_instances").read_text()) == 7
    assert (types / "devices" / UUID).resolve() == real


def test_dev_nodes_only_for_groups_with_a_vfio_device(host: SimHost) -> None:
    dev = Path(host.dev_root)
    assert sorted(os.listdir(dev / "vfio")) == ["10", "11", "13", "14", "devices", "vfio"]
    assert (dev / "iommu").exists()
    assert sorted(os.listdir(dev / "vfio/devices")) == ["vfio0", "vfio1", "vfio2", "vfio3"]
    with pytest.raises(KernelError) as e:
        host.kernel.open(str(dev / "vfio/12"), os.O_RDWR)     # "not ours" group: no node
    assert e.value.errno == errno.ENOENT


def test_viability_follows_host_drivers(host: SimHost) -> None:
    assert host.group(10).viable
    assert not host.group(13).viable          # 0000:5e:00.1 bound to ixgbe
    assert host.group(14).viable              # the other member is unbound
    assert host.group_of("0000:5e:00.1") == 13
    assert host.group(11).kind == "mdev" and host.group(10).kind == "pci"


def test_sysfs_reads_go_to_the_built_tree(host: SimHost) -> None:
    k = host.kernel
    base = os.path.join(host.sysfs_root, "bus/pci/devices/0000:3b:00.0")
    assert os.path.basename(k.readlink(base + "/driver")) == "mlx5_core"
    assert k.read_text(base + "/vendor").strip() == "0x8086"
    assert k.exists(base) and not k.exists(base + "/nope")
    assert "0000:3b:00.1" in k.listdir(os.path.join(host.sysfs_root, "bus/pci/devices"))


def test_config_toggles_cdev_and_iommufd(tmp_path: Path) -> None:
    h = SimHost.build(tmp_path, [[DeviceSpec("0000:01:00.0")]], build_parts=no_parts,
                      config=SimHostConfig(cdev=False, iommufd=False, first_group=3))
    assert not (Path(h.dev_root) / "iommu").exists()
    assert not (Path(h.dev_root) / "vfio/devices").exists()
    assert (Path(h.dev_root) / "vfio/3").exists()
    assert h.device("0000:01:00.0").cdev_name is None


@pytest.mark.parametrize("groups, message", [
    ([[DeviceSpec(UUID, kind="mdev"), DeviceSpec("0000:01:00.0")]], "alone"),
    ([[DeviceSpec("0000:01:00.0")], [DeviceSpec("0000:01:00.0")]], "twice"),
    ([[DeviceSpec("0000:01:00.0", kind="platform")]], "kind"),
])
def test_bad_topology_is_refused(tmp_path: Path, groups: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimHost.build(tmp_path, groups, build_parts=no_parts)


def test_unknown_device_lookup_names_what_exists(host: SimHost) -> None:
    with pytest.raises(KeyError, match="0000:3b:00.1"):
        host.device("0000:99:00.0")


def test_build_parts_receives_each_spec_and_the_kernel(tmp_path: Path) -> None:
    seen: list[tuple[str, object]] = []

    def record(spec: DeviceSpec, fds: object) -> DeviceParts:
        seen.append((spec.name, fds))
        return DeviceParts()

    h = SimHost.build(tmp_path, [[DeviceSpec("0000:01:00.0")], [DeviceSpec(UUID, kind="mdev")]],
                      build_parts=record)
    assert [n for n, _ in seen] == ["0000:01:00.0", UUID]
    assert all(fds is h.kernel for _, fds in seen)


# -- the fd table ---------------------------------------------------------------------------

def test_sim_kernel_is_a_kernel_ops(host: SimHost) -> None:
    assert isinstance(host.kernel, KernelOps)


def test_sim_fds_start_above_real_fd_range_and_install_works(host: SimHost) -> None:
    k = host.kernel
    fd = k.open(os.path.join(host.dev_root, "vfio/vfio"), os.O_RDWR)
    assert fd >= SIM_FD_BASE
    other = k.install(SimFile("data"))
    assert other > fd and isinstance(k.file_of(other), SimFile)
    k.close(other)
    k.close(fd)
    assert k.open_files() == {}


def test_unknown_sim_fd_is_ebadf(host: SimHost) -> None:
    k = host.kernel
    for call in (lambda: k.close(SIM_FD_BASE + 999), lambda: k.ioctl(SIM_FD_BASE + 999, 0x3b64),
                 lambda: k.read(SIM_FD_BASE + 999, 1), lambda: k.pread(SIM_FD_BASE + 999, 1, 0),
                 lambda: k.pread_into(SIM_FD_BASE + 999, bytearray(1), 0)):
        with pytest.raises(KernelError) as e:
            call()
        assert e.value.errno == errno.EBADF


def test_real_fds_go_to_the_real_kernel(host: SimHost) -> None:
    k = host.kernel
    fd = k.memfd_create("guest-ram", 1 << 20)
    assert fd < SIM_FD_BASE
    assert k.pwrite(fd, b"hello", 4096) == 5
    m = k.mmap(fd, 1 << 20)
    assert m[4096:4101] == b"hello"
    m.close()
    buf = bytearray(8)
    assert k.pread_into(fd, memoryview(buf)[:5], 4096) == 5 and buf == b"hello\0\0\0"
    assert k.pread_into(fd, buf, (1 << 20) - 2) == 2          # short at the end of the file
    with pytest.raises(KernelError, match=r"pread\(fd -1, 8@0x0\)") as e:
        k.pread_into(-1, buf, 0)
    assert e.value.errno == errno.EBADF
    with pytest.raises(KernelError) as e:           # a VFIO request on a memfd: real ENOTTY
        k.ioctl(fd, 0x3b64, 0, label="VFIO_GET_API_VERSION")
    assert e.value.errno == errno.ENOTTY
    k.close(fd)


def test_anonymous_memory_is_private_and_zeroed(host: SimHost) -> None:
    k = host.kernel
    a, b = k.anonymous_memory(1 << 20), k.anonymous_memory(1 << 20)
    a[:5] = b"hello"
    assert len(a) == 1 << 20 and a[:5] == b"hello" and b[:5] == bytes(5)
    a.close()
    b.close()
    with pytest.raises(KernelError, match=r"mmap\(anonymous, 0\)"):
        k.anonymous_memory(0)


def test_unknown_request_on_a_file_kind_is_enotty(host: SimHost) -> None:
    k = host.kernel
    fd = k.open(os.path.join(host.dev_root, "vfio/vfio"), os.O_RDWR)
    with pytest.raises(KernelError) as e:
        k.ioctl(fd, 0x3b79, 0)       # VFIO_MIG_GET_PRECOPY_INFO is a data-fd request
    assert e.value.errno == errno.ENOTTY
    k.close(fd)
