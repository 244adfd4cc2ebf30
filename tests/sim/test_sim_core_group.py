"""Container and group fds of the simulated kernel: every rule and errno of docs/kernel-contract.md
§3.1 - §3.2 and §8, close ordering, and fault injection at a named ioctl."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import vfiod.abi.vfio as v
from vfiod.errors import KernelError
from vfiod.kernel.sim import HostDevice, SimHost
from vfiod.kernel.sim.interfaces import DeviceParts, DeviceSpec
from vfiod.kernel.sim.rawvfio import map_dma, open_device

BDF = "0000:3b:00.1"
BDF2 = "0000:3b:00.2"
UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"


class Resets:
    """A part that records resets and closes, in order."""

    def __init__(self) -> None:
        self.count = 0
        self.events: list[str] = []

    def reset(self) -> None:
        self.count += 1
        self.events.append("reset")

    def on_close(self) -> None:
        self.events.append("close")


@pytest.fixture
def host(tmp_path: Path):
    resets: dict[str, Resets] = {}

    def parts(spec: DeviceSpec, fds: object) -> DeviceParts:
        resets[spec.name] = Resets()
        return DeviceParts(resettables=[resets[spec.name]], closables=[resets[spec.name]])

    h = SimHost.build(tmp_path, [
        [DeviceSpec(BDF), DeviceSpec(BDF2)],                                # 10
        [DeviceSpec(UUID, kind="mdev")],                                     # 11
        [DeviceSpec("0000:5e:00.0"), HostDevice("0000:5e:00.1")],           # 12, not viable
    ], build_parts=parts)
    h.resets = resets  # type: ignore[attr-defined]
    yield h
    h.close()


def node(h: SimHost, n: int | str) -> str:
    return os.path.join(h.dev_root, "vfio", str(n))


def errno_of(call: Callable[..., object], *args: object, **kwargs: object) -> int:
    with pytest.raises(KernelError) as e:
        call(*args, **kwargs)
    return e.value.errno


def status(h: SimHost, gfd: int, argsz: int = 8) -> int:
    st = v.vfio_group_status(argsz=argsz)
    h.kernel.ioctl(gfd, v.VFIO_GROUP_GET_STATUS, st)
    return int(st.flags)


def name_buf(name: str) -> ctypes.Array:
    return ctypes.create_string_buffer(name.encode())


# -- container --------------------------------------------------------------------------------

def test_api_version_and_extensions(host: SimHost) -> None:
    k = host.kernel
    c = k.open(node(host, "vfio"), os.O_RDWR)
    assert k.ioctl(c, v.VFIO_GET_API_VERSION, 0) == v.VFIO_API_VERSION == 0
    for ext in (v.VFIO_TYPE1_IOMMU, v.VFIO_TYPE1v2_IOMMU, v.VFIO_UNMAP_ALL):
        assert k.ioctl(c, v.VFIO_CHECK_EXTENSION, ext) == 1
    for ext in (v.VFIO_SPAPR_TCE_IOMMU, v.VFIO_NOIOMMU_IOMMU, v.VFIO_EEH, 77):
        assert k.ioctl(c, v.VFIO_CHECK_EXTENSION, ext) == 0
    # Answers that need an IOMMU: 0 before SET_IOMMU, then 1 (pci group, no emulated one).
    assert k.ioctl(c, v.VFIO_CHECK_EXTENSION, v.VFIO_DMA_CC_IOMMU) == 0
    assert k.ioctl(c, v.VFIO_CHECK_EXTENSION, v.VFIO_UPDATE_VADDR) == 0
    g = k.open(node(host, 10), os.O_RDWR)
    k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(c))
    k.ioctl(c, v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU)
    assert k.ioctl(c, v.VFIO_CHECK_EXTENSION, v.VFIO_DMA_CC_IOMMU) == 1
    assert k.ioctl(c, v.VFIO_CHECK_EXTENSION, v.VFIO_UPDATE_VADDR) == 1
    k.close(g)
    k.close(c)


def test_update_vaddr_is_off_with_an_emulated_device(host: SimHost) -> None:
    raw = open_device(host.kernel, host.dev_root, 11, UUID)
    assert host.kernel.ioctl(raw.container, v.VFIO_CHECK_EXTENSION, v.VFIO_UPDATE_VADDR) == 0
    raw.close()


def test_set_iommu_rules(host: SimHost) -> None:
    k = host.kernel
    c = k.open(node(host, "vfio"), os.O_RDWR)
    assert errno_of(lambda: k.ioctl(c, v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU)) == errno.EINVAL
    g = k.open(node(host, 10), os.O_RDWR)
    k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(c))
    assert errno_of(lambda: k.ioctl(c, v.VFIO_SET_IOMMU, v.VFIO_SPAPR_TCE_IOMMU)) == errno.ENODEV
    assert errno_of(lambda: k.ioctl(c, v.VFIO_SET_IOMMU, 99)) == errno.ENODEV
    k.ioctl(c, v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU)
    assert errno_of(lambda: k.ioctl(c, v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU)) == errno.EINVAL
    k.close(g)
    k.close(c)


def test_iommu_requests_before_set_iommu_are_einval(host: SimHost) -> None:
    k = host.kernel
    c = k.open(node(host, "vfio"), os.O_RDWR)
    info = v.vfio_iommu_type1_info(argsz=24)
    assert errno_of(lambda: k.ioctl(c, v.VFIO_IOMMU_GET_INFO, info)) == errno.EINVAL
    k.close(c)


# -- group ----------------------------------------------------------------------------------------

def test_second_open_of_a_group_is_ebusy_until_closed(host: SimHost) -> None:
    k = host.kernel
    g = k.open(node(host, 10), os.O_RDWR)
    assert errno_of(lambda: k.open(node(host, 10), os.O_RDWR)) == errno.EBUSY
    k.close(g)
    k.close(k.open(node(host, 10), os.O_RDWR))


def test_status_flags(host: SimHost) -> None:
    k = host.kernel
    g = k.open(node(host, 10), os.O_RDWR)
    assert status(host, g) == v.VFIO_GROUP_FLAGS_VIABLE
    assert errno_of(lambda: status(host, g, argsz=7)) == errno.EINVAL
    c = k.open(node(host, "vfio"), os.O_RDWR)
    k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(c))
    assert status(host, g) == v.VFIO_GROUP_FLAGS_VIABLE | v.VFIO_GROUP_FLAGS_CONTAINER_SET
    bad = k.open(node(host, 12), os.O_RDWR)
    assert status(host, bad) == 0
    for fd in (bad, g, c):
        k.close(fd)


def test_set_container_errors(host: SimHost) -> None:
    k = host.kernel
    g = k.open(node(host, 10), os.O_RDWR)
    c = k.open(node(host, "vfio"), os.O_RDWR)
    closed = k.open(node(host, "vfio"), os.O_RDWR)
    k.close(closed)
    assert errno_of(lambda: k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(closed))) \
        == errno.EBADF
    assert errno_of(lambda: k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(-1))) \
        == errno.EBADF
    g2 = k.open(node(host, 11), os.O_RDWR)            # a group fd is not a container
    assert errno_of(lambda: k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(g2))) \
        == errno.EBADFD
    iommufd = k.open(os.path.join(host.dev_root, "iommu"), os.O_RDWR)
    assert errno_of(lambda: k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(iommufd))) \
        == errno.EBADFD
    memfd = k.memfd_create("x", 4096)                  # a real fd that is not a container
    assert errno_of(lambda: k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(memfd))) \
        == errno.EBADFD
    assert errno_of(lambda: k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, c)) == errno.EFAULT
    k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(c))
    assert errno_of(lambda: k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(c))) \
        == errno.EINVAL
    for fd in (memfd, iommufd, g2, g, c):
        k.close(fd)


def test_non_viable_group_cannot_take_a_container(host: SimHost) -> None:
    k = host.kernel
    g = k.open(node(host, 12), os.O_RDWR)
    c = k.open(node(host, "vfio"), os.O_RDWR)
    with pytest.raises(KernelError) as e:
        k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(c),
                label="VFIO_GROUP_SET_CONTAINER", target="group 12")
    assert e.value.errno == errno.EPERM
    assert str(e.value).startswith("VFIO_GROUP_SET_CONTAINER on group 12: EPERM")
    k.close(g)
    k.close(c)


def test_get_device_fd_rules(host: SimHost) -> None:
    k = host.kernel
    g = k.open(node(host, 10), os.O_RDWR)
    get = v.VFIO_GROUP_GET_DEVICE_FD
    # Unknown name first (ENODEV), then a missing container / IOMMU (EINVAL).
    assert errno_of(lambda: k.ioctl(g, get, name_buf("0000:99:00.0"))) == errno.ENODEV
    assert errno_of(lambda: k.ioctl(g, get, name_buf(BDF))) == errno.EINVAL
    c = k.open(node(host, "vfio"), os.O_RDWR)
    k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(c))
    assert errno_of(lambda: k.ioctl(g, get, name_buf(BDF))) == errno.EINVAL
    k.ioctl(c, v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU)
    assert errno_of(lambda: k.ioctl(g, get, bytearray(BDF.encode()))) == errno.EINVAL  # no NUL
    assert errno_of(lambda: k.ioctl(g, get, name_buf(BDF + " junk"))) == errno.EINVAL
    assert errno_of(lambda: k.ioctl(g, get, name_buf(UUID))) == errno.ENODEV   # other group
    d1 = k.ioctl(g, get, name_buf(BDF))
    d2 = k.ioctl(g, get, name_buf(BDF2 + " vf_token=2ab74924-c335-45f4-9b16-8569e5b08258"))
    d3 = k.ioctl(g, get, name_buf(BDF))                 # a device may be opened twice
    assert len({d1, d2, d3}) == 3
    for fd in (d1, d2, d3, g, c):
        k.close(fd)


def test_unset_container(host: SimHost) -> None:
    k = host.kernel
    g = k.open(node(host, 10), os.O_RDWR)
    assert errno_of(lambda: k.ioctl(g, v.VFIO_GROUP_UNSET_CONTAINER, 0)) == errno.EINVAL
    c = k.open(node(host, "vfio"), os.O_RDWR)
    k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(c))
    k.ioctl(c, v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU)
    d = k.ioctl(g, v.VFIO_GROUP_GET_DEVICE_FD, name_buf(BDF))
    assert errno_of(lambda: k.ioctl(g, v.VFIO_GROUP_UNSET_CONTAINER, 0)) == errno.EBUSY
    k.close(d)
    k.ioctl(g, v.VFIO_GROUP_UNSET_CONTAINER, 0)
    assert status(host, g) == v.VFIO_GROUP_FLAGS_VIABLE
    # The last group left: the IOMMU went with it.
    assert errno_of(lambda: k.ioctl(c, v.VFIO_IOMMU_GET_INFO, v.vfio_iommu_type1_info(argsz=24))) \
        == errno.EINVAL
    k.close(g)
    k.close(c)


def test_last_group_leaving_drops_every_mapping(host: SimHost) -> None:
    k = host.kernel
    raw = open_device(k, host.dev_root, 10, BDF)
    map_dma(k, raw.container, 0, 1 << 21, 1 << 40)
    k.close(raw.device)
    k.ioctl(raw.group, v.VFIO_GROUP_UNSET_CONTAINER, 0)
    k.ioctl(raw.group, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(raw.container))
    k.ioctl(raw.container, v.VFIO_SET_IOMMU, v.VFIO_TYPE1v2_IOMMU)
    map_dma(k, raw.container, 0, 1 << 21, 1 << 40)      # no EEXIST: the old one is gone
    k.close(raw.group)
    k.close(raw.container)


def test_device_fds_keep_the_group_alive_after_its_fd_closes(host: SimHost) -> None:
    k = host.kernel
    raw = open_device(k, host.dev_root, 10, BDF)
    k.close(raw.group)                 # wrong order on purpose: the device still holds it
    k.close(raw.container)
    assert errno_of(lambda: k.open(node(host, 10), os.O_RDWR)) == errno.EBUSY
    # The device still works: its container's IOMMU is alive.
    info = v.vfio_device_info(argsz=24)
    k.ioctl(raw.device, v.VFIO_DEVICE_GET_INFO, info)
    k.close(raw.device)                # last reference: group released, container detached
    g = k.open(node(host, 10), os.O_RDWR)
    assert status(host, g) == v.VFIO_GROUP_FLAGS_VIABLE
    k.close(g)
    assert k.open_files() == {}


def test_last_device_close_resets_its_parts(host: SimHost) -> None:
    k = host.kernel
    resets = host.resets[BDF]  # type: ignore[attr-defined]
    raw = open_device(k, host.dev_root, 10, BDF)
    d2 = k.ioctl(raw.group, v.VFIO_GROUP_GET_DEVICE_FD, name_buf(BDF))
    k.ioctl(d2, v.VFIO_DEVICE_RESET, 0)
    assert resets.events == ["reset"]  # a reset is not a close
    k.close(d2)
    assert resets.events == ["reset"]  # still open through raw.device
    raw.close()
    assert resets.events == ["reset", "reset", "close"]


# -- fault injection ------------------------------------------------------------------------------

def test_fault_at_a_named_ioctl_fails_exactly_that_call(host: SimHost) -> None:
    k = host.kernel
    k.faults.inject("ioctl:VFIO_GROUP_GET_DEVICE_FD", errno.EIO)
    with pytest.raises(KernelError) as e:
        open_device(k, host.dev_root, 10, BDF)
    assert e.value.errno == errno.EIO and "injected" in e.value.detail
    for fd in list(k.open_files()):
        k.close(fd)
    raw = open_device(k, host.dev_root, 10, BDF)     # count=1: the next call succeeds
    raw.close()


def test_fault_can_target_one_device_and_skip_calls(host: SimHost) -> None:
    k = host.kernel
    f = k.faults.inject(f"ioctl:VFIO_DEVICE_GET_INFO@{BDF2}", errno.ENXIO, skip=1)
    raw = open_device(k, host.dev_root, 10, BDF)
    d2 = k.ioctl(raw.group, v.VFIO_GROUP_GET_DEVICE_FD, name_buf(BDF2))
    info = v.vfio_device_info(argsz=24)
    k.ioctl(raw.device, v.VFIO_DEVICE_GET_INFO, info)    # other device: not affected
    k.ioctl(d2, v.VFIO_DEVICE_GET_INFO, info)            # skipped once
    assert errno_of(lambda: k.ioctl(d2, v.VFIO_DEVICE_GET_INFO, info)) == errno.ENXIO
    k.ioctl(d2, v.VFIO_DEVICE_GET_INFO, info)
    assert f.hits == 1
    assert f"ioctl:VFIO_DEVICE_GET_INFO@{BDF2}" in k.faults.log
    k.close(d2)
    raw.close()


def test_fault_log_keeps_the_latest_events_within_its_limit(host: SimHost) -> None:
    k = host.kernel
    k.faults.log_limit = 3
    raw = open_device(k, host.dev_root, 10, BDF)
    info = v.vfio_device_info(argsz=24)
    for _ in range(10):
        k.ioctl(raw.device, v.VFIO_DEVICE_GET_INFO, info)
        assert 3 <= len(k.faults.log) < 6
    assert k.faults.log[-3:] == [f"ioctl:VFIO_DEVICE_GET_INFO@{BDF}"] * 3
    k.faults.log_limit = None                      # the default: every event is kept
    before = len(k.faults.log)
    for _ in range(10):
        k.ioctl(raw.device, v.VFIO_DEVICE_GET_INFO, info)
    assert len(k.faults.log) == before + 10
    raw.close()
