"""iommufd and the VFIO cdev in the simulated kernel: command conventions, IOAS, HWPT
allocation and attach, dirty tracking and its bitmap (docs/kernel-contract.md §4.1 - §4.4, §8)."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vfiod.abi.iommufd as iu
import vfiod.abi.vfio as v
from vfiod.errors import KernelError
from vfiod.kernel.sim import SimHost
from vfiod.kernel.sim.interfaces import DeviceParts, DeviceSpec

DIRTY = "0000:3b:00.1"        # behind an IOMMU with A/D bits
PLAIN = "0000:3b:00.2"        # behind one without
PG = 4096
VA = 1 << 40


@pytest.fixture
def host(tmp_path: Path):
    h = SimHost.build(tmp_path, [
        [DeviceSpec(DIRTY, extra={"iommu_dirty_tracking": True})],
        [DeviceSpec(PLAIN)],
    ], build_parts=lambda s, f: DeviceParts())
    yield h
    for fd in list(h.kernel.open_files()):
        h.kernel.close(fd)
    h.close()


def errno_of(call: Callable[..., object], *args: object, **kwargs: object) -> int:
    with pytest.raises(KernelError) as e:
        call(*args, **kwargs)
    return e.value.errno


def cmd(struct_type: type, **fields: int) -> Any:
    s = struct_type()
    s.size = ctypes.sizeof(struct_type)
    for name, val in fields.items():
        setattr(s, name, val)
    return s


class Fds:
    """An iommufd plus helpers for its commands."""

    def __init__(self, h: SimHost) -> None:
        self.h, self.k = h, h.kernel
        self.fd = self.k.open(os.path.join(h.dev_root, "iommu"), os.O_RDWR)

    def call(self, request: int, arg: Any) -> Any:
        self.k.ioctl(self.fd, request, arg)
        return arg

    def ioas(self) -> int:
        return self.call(iu.IOMMU_IOAS_ALLOC, cmd(iu.iommu_ioas_alloc)).out_ioas_id

    def map(self, ioas: int, iova: int, length: int, flags: int | None = None) -> int:
        f = (iu.IOMMU_IOAS_MAP_FIXED_IOVA | iu.IOMMU_IOAS_MAP_READABLE
             | iu.IOMMU_IOAS_MAP_WRITEABLE) if flags is None else flags
        return self.call(iu.IOMMU_IOAS_MAP, cmd(iu.iommu_ioas_map, flags=f, ioas_id=ioas,
                                                user_va=VA + iova, length=length,
                                                iova=iova)).iova

    def unmap(self, ioas: int, iova: int, length: int) -> int:
        return self.call(iu.IOMMU_IOAS_UNMAP, cmd(iu.iommu_ioas_unmap, ioas_id=ioas,
                                                  iova=iova, length=length)).length

    def hwpt(self, dev_id: int, ioas: int, dirty: bool = True) -> int:
        flags = iu.IOMMU_HWPT_ALLOC_DIRTY_TRACKING if dirty else 0
        return self.call(iu.IOMMU_HWPT_ALLOC, cmd(iu.iommu_hwpt_alloc, flags=flags,
                                                  dev_id=dev_id, pt_id=ioas)).out_hwpt_id

    def tracking(self, hwpt: int, on: bool) -> None:
        self.call(iu.IOMMU_HWPT_SET_DIRTY_TRACKING,
                  cmd(iu.iommu_hwpt_set_dirty_tracking, hwpt_id=hwpt,
                      flags=iu.IOMMU_HWPT_DIRTY_TRACKING_ENABLE if on else 0))

    def dirty(self, hwpt: int, iova: int, length: int, page: int = PG,
              flags: int = 0) -> list[int]:
        bm = np.zeros(max(1, -(-(length // page) // 64)), np.uint64)
        self.call(iu.IOMMU_HWPT_GET_DIRTY_BITMAP,
                  cmd(iu.iommu_hwpt_get_dirty_bitmap, hwpt_id=hwpt, flags=flags, iova=iova,
                      length=length, page_size=page, data=bm.ctypes.data))
        return list(np.flatnonzero(np.unpackbits(bm.view(np.uint8), bitorder="little")))

    def cdev(self, name: str) -> int:
        node = self.h.device(name)
        return self.k.open(os.path.join(self.h.dev_root, "vfio/devices", node.cdev_name or ""),
                           os.O_RDWR)

    def bind(self, cdev: int) -> int:
        arg = v.vfio_device_bind_iommufd(argsz=16, iommufd=self.fd)
        self.k.ioctl(cdev, v.VFIO_DEVICE_BIND_IOMMUFD, arg)
        return int(arg.out_devid)

    def attach(self, cdev: int, pt_id: int) -> int:
        arg = v.vfio_device_attach_iommufd_pt(argsz=12, pt_id=pt_id)
        self.k.ioctl(cdev, v.VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg)
        return int(arg.pt_id)


@pytest.fixture
def fds(host: SimHost) -> Fds:
    return Fds(host)


# -- the cdev ---------------------------------------------------------------------------------

def test_cdev_refuses_everything_before_bind(fds: Fds) -> None:
    c = fds.cdev(DIRTY)
    k = fds.k
    assert errno_of(lambda: k.ioctl(c, v.VFIO_DEVICE_GET_INFO, v.vfio_device_info(argsz=24))) \
        == errno.EINVAL
    assert errno_of(lambda: fds.attach(c, 1)) == errno.EINVAL
    assert errno_of(lambda: k.pread(c, 4, 7 << 40)) == errno.EINVAL
    assert errno_of(lambda: k.mmap(c, 4096, 0)) == errno.EINVAL
    fds.bind(c)
    info = v.vfio_device_info(argsz=24)
    k.ioctl(c, v.VFIO_DEVICE_GET_INFO, info)
    assert info.num_regions == v.VFIO_PCI_NUM_REGIONS


def test_cdev_and_group_exclude_each_other(fds: Fds) -> None:
    k, group = fds.k, os.path.join(fds.h.dev_root, "vfio/10")
    c = fds.cdev(DIRTY)
    assert errno_of(lambda: k.open(group, os.O_RDWR)) == errno.EBUSY
    k.close(c)
    g = k.open(group, os.O_RDWR)
    assert errno_of(lambda: fds.cdev(DIRTY)) == errno.EBUSY
    k.close(g)


def test_bind_errors(fds: Fds) -> None:
    k = fds.k
    c = fds.cdev(DIRTY)
    container = k.open(os.path.join(fds.h.dev_root, "vfio/vfio"), os.O_RDWR)
    dead = k.open(os.path.join(fds.h.dev_root, "iommu"), os.O_RDWR)
    k.close(dead)
    cases = [(v.vfio_device_bind_iommufd(argsz=15, iommufd=fds.fd), errno.EINVAL),
             (v.vfio_device_bind_iommufd(argsz=16, flags=1, iommufd=fds.fd), errno.EINVAL),
             (v.vfio_device_bind_iommufd(argsz=16, iommufd=-1), errno.EINVAL),
             (v.vfio_device_bind_iommufd(argsz=16, iommufd=dead), errno.EBADF),
             (v.vfio_device_bind_iommufd(argsz=16, iommufd=container), errno.EBADFD)]
    for arg, err in cases:
        assert errno_of(k.ioctl, c, v.VFIO_DEVICE_BIND_IOMMUFD, arg) == err
    assert fds.bind(c) >= 1
    assert errno_of(lambda: fds.bind(c)) == errno.EINVAL          # bound once only


# -- iommufd conventions -------------------------------------------------------------------------

def test_size_rules(fds: Fds) -> None:
    k = fds.k
    short = bytearray(ctypes.sizeof(iu.iommu_ioas_alloc))
    short[0] = 8                                               # below offsetofend(out_ioas_id)
    assert errno_of(lambda: k.ioctl(fds.fd, iu.IOMMU_IOAS_ALLOC, short)) == errno.EINVAL
    longer = bytearray(32)
    longer[0] = 32                                             # zero tail: accepted
    k.ioctl(fds.fd, iu.IOMMU_IOAS_ALLOC, longer)
    assert int.from_bytes(longer[8:12], "little") >= 1
    longer[20] = 1                                             # non-zero unknown tail
    assert errno_of(lambda: k.ioctl(fds.fd, iu.IOMMU_IOAS_ALLOC, longer)) == errno.E2BIG
    assert errno_of(lambda: fds.call(iu.IOMMU_IOAS_ALLOC, cmd(iu.iommu_ioas_alloc, flags=1))) \
        == errno.EOPNOTSUPP
    assert errno_of(lambda: fds.call(iu.IOMMU_OPTION, cmd(iu.iommu_option))) == errno.ENOTTY


def test_ioas_map_and_unmap(fds: Fds) -> None:
    ioas = fds.ioas()
    assert fds.map(ioas, 0x100000, 16 * PG) == 0x100000
    fixed = iu.IOMMU_IOAS_MAP_FIXED_IOVA | iu.IOMMU_IOAS_MAP_WRITEABLE
    assert errno_of(lambda: fds.map(ioas, 0x100000 + 8 * PG, 16 * PG)) == errno.EEXIST
    assert errno_of(lambda: fds.map(ioas, 0x200100, PG)) == errno.EINVAL       # unaligned
    assert errno_of(lambda: fds.map(ioas, 0x200000, 100)) == errno.EINVAL
    assert errno_of(lambda: fds.map(ioas, 0x200000, 0)) == errno.EINVAL
    assert errno_of(lambda: fds.map(ioas, (1 << 64) - PG, 2 * PG, fixed)) == errno.EOVERFLOW
    assert errno_of(lambda: fds.map(ioas + 99, 0x200000, PG)) == errno.ENOENT
    assert errno_of(lambda: fds.map(ioas, 0x200000, PG, fixed | 0x80)) == errno.EOPNOTSUPP
    auto = fds.map(ioas, 0, 4 * PG, iu.IOMMU_IOAS_MAP_WRITEABLE)               # kernel picks
    assert auto % PG == 0 and not 0x100000 - 4 * PG < auto < 0x100000 + 16 * PG
    assert errno_of(lambda: fds.unmap(ioas, 0x100000, 8 * PG)) == errno.ENOENT  # bisects
    assert errno_of(lambda: fds.unmap(ioas, 1 << 40, PG)) == errno.ENOENT       # nothing
    assert fds.unmap(ioas, 0x100000, 16 * PG) == 16 * PG
    assert fds.unmap(ioas, 0, (1 << 64) - 1) == 4 * PG                           # unmap all
    assert fds.unmap(ioas, 0, (1 << 64) - 1) == 0                                # empty: ok


def test_iova_ranges(fds: Fds) -> None:
    ioas = fds.ioas()
    ranges = (iu.iommu_iova_range * 2)()
    arg = cmd(iu.iommu_ioas_iova_ranges, ioas_id=ioas, num_iovas=2,
              allowed_iovas=ctypes.addressof(ranges))
    fds.call(iu.IOMMU_IOAS_IOVA_RANGES, arg)
    assert (arg.num_iovas, arg.out_iova_alignment) == (1, PG)
    assert (ranges[0].start, ranges[0].last) == (0, (1 << 64) - 1)
    arg = cmd(iu.iommu_ioas_iova_ranges, ioas_id=ioas, num_iovas=0, allowed_iovas=0)
    assert errno_of(lambda: fds.call(iu.IOMMU_IOAS_IOVA_RANGES, arg)) == errno.EMSGSIZE
    assert arg.num_iovas == 1                     # the count still comes back


# -- devices, HWPTs ---------------------------------------------------------------------------------

def test_hw_info_reports_dirty_capability(fds: Fds) -> None:
    for name, caps in ((DIRTY, iu.IOMMU_HW_CAP_DIRTY_TRACKING), (PLAIN, 0)):
        dev_id = fds.bind(fds.cdev(name))
        info = fds.call(iu.IOMMU_GET_HW_INFO, cmd(iu.iommu_hw_info, dev_id=dev_id))
        assert info.out_capabilities == caps
    assert errno_of(lambda: fds.call(iu.IOMMU_GET_HW_INFO, cmd(iu.iommu_hw_info, dev_id=99))) \
        == errno.ENOENT


def test_hwpt_alloc_and_attach_rules(fds: Fds) -> None:
    ioas = fds.ioas()
    plain_cdev, dirty_cdev = fds.cdev(PLAIN), fds.cdev(DIRTY)
    plain, dirty = fds.bind(plain_cdev), fds.bind(dirty_cdev)
    assert errno_of(lambda: fds.hwpt(plain, ioas)) == errno.EOPNOTSUPP
    assert errno_of(lambda: fds.hwpt(dirty, ioas + 50)) == errno.ENOENT
    bad_flags = cmd(iu.iommu_hwpt_alloc, flags=0x40, dev_id=dirty, pt_id=ioas)
    assert errno_of(lambda: fds.call(iu.IOMMU_HWPT_ALLOC, bad_flags)) == errno.EOPNOTSUPP
    hwpt = fds.hwpt(dirty, ioas)
    assert errno_of(lambda: fds.attach(plain_cdev, hwpt)) == errno.EINVAL    # enforced
    assert fds.attach(dirty_cdev, hwpt) == hwpt
    auto = fds.attach(plain_cdev, ioas)                                      # auto HWPT
    assert auto not in (ioas, hwpt)
    destroy = lambda i: fds.call(iu.IOMMU_DESTROY, cmd(iu.iommu_destroy, id=i))  # noqa: E731
    for busy in (ioas, hwpt, dirty):
        assert errno_of(destroy, busy) == errno.EBUSY
    assert errno_of(lambda: destroy(12345)) == errno.ENOENT
    fds.k.close(plain_cdev)                   # unbind: its auto HWPT goes with it
    assert errno_of(lambda: destroy(auto)) == errno.ENOENT
    fds.k.ioctl(dirty_cdev, v.VFIO_DEVICE_DETACH_IOMMUFD_PT,
                v.vfio_device_detach_iommufd_pt(argsz=8))
    destroy(hwpt)
    destroy(ioas)


# -- dirty tracking --------------------------------------------------------------------------------------

@pytest.fixture
def tracked(fds: Fds):
    ioas = fds.ioas()
    cdev = fds.cdev(DIRTY)
    hwpt = fds.hwpt(fds.bind(cdev), ioas)
    fds.attach(cdev, hwpt)
    fds.map(ioas, 0x10000, 64 * PG)
    fds.map(ioas, 0x10000 + 80 * PG, 16 * PG)
    return fds, hwpt, fds.h.device(DIRTY)


def test_dirty_bitmap_semantics(tracked) -> None:
    fds, hwpt, dev = tracked
    base = 0x10000
    assert errno_of(lambda: fds.dirty(hwpt, base, 96 * PG)) == errno.EINVAL      # not enabled
    dev.dma_write(base, 8)                                                       # untracked
    fds.tracking(hwpt, True)
    dev.dma_write(base + 3 * PG + 10, PG)                                        # pages 3, 4
    dev.dma_write(base + 81 * PG, 8)                                             # page 81
    assert fds.dirty(hwpt, base, 96 * PG, flags=iu.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR) \
        == [3, 4, 81]
    assert fds.dirty(hwpt, base + 2 * PG, 2 * PG) == [1]           # relative; clears page 3
    assert fds.dirty(hwpt, base, 96 * PG, page=2 * PG) == [2, 40]  # pages 4, 81 at 8 KiB
    assert fds.dirty(hwpt, base, 96 * PG) == []


def test_enable_clears_stale_bits(tracked) -> None:
    fds, hwpt, dev = tracked
    fds.tracking(hwpt, True)
    dev.dma_write(0x10000, 8)
    fds.tracking(hwpt, False)
    fds.tracking(hwpt, True)
    assert fds.dirty(hwpt, 0x10000, 64 * PG) == []


def test_dirty_bitmap_checks(tracked) -> None:
    fds, hwpt, _ = tracked
    fds.tracking(hwpt, True)
    assert errno_of(lambda: fds.dirty(hwpt, 0x10000 + 100, 64 * PG)) == errno.EINVAL
    assert errno_of(lambda: fds.dirty(hwpt, 0x10000, 64 * PG + 8)) == errno.EINVAL
    assert errno_of(lambda: fds.dirty(hwpt, 0x10000, 0)) == errno.EOVERFLOW   # length-1 wraps
    assert fds.dirty(hwpt, 0, 0) == []               # ... but not from 0: an empty answer
    assert errno_of(lambda: fds.dirty(hwpt, (1 << 64) - PG, 2 * PG)) == errno.EOVERFLOW
    assert errno_of(lambda: fds.dirty(hwpt, 0x10000, 64 * PG, page=3 * PG)) == errno.EINVAL
    assert errno_of(lambda: fds.dirty(hwpt, 0x11000, 4 * PG, page=8 * PG)) == errno.EINVAL
    assert errno_of(lambda: fds.dirty(hwpt, 0x10000, 64 * PG, flags=2)) == errno.EOPNOTSUPP
    assert errno_of(lambda: fds.dirty(hwpt + 40, 0x10000, 64 * PG)) == errno.ENOENT
    bad = cmd(iu.iommu_hwpt_set_dirty_tracking, hwpt_id=hwpt, flags=2)
    assert errno_of(lambda: fds.call(iu.IOMMU_HWPT_SET_DIRTY_TRACKING, bad)) == errno.EOPNOTSUPP


def test_hwpt_without_dirty_ops(fds: Fds) -> None:
    ioas = fds.ioas()
    cdev = fds.cdev(DIRTY)
    hwpt = fds.hwpt(fds.bind(cdev), ioas, dirty=False)
    assert errno_of(lambda: fds.tracking(hwpt, True)) == errno.EOPNOTSUPP
    assert errno_of(lambda: fds.dirty(hwpt, 0, PG)) == errno.EOPNOTSUPP


def test_dma_to_unmapped_iova_faults(tracked) -> None:
    fds, hwpt, dev = tracked
    with pytest.raises(KernelError) as e:
        dev.dma_write(0x10000 + 70 * PG, 8)              # the hole between the two areas
    assert e.value.errno == errno.EFAULT


def test_unmapped_area_loses_its_bits(tracked) -> None:
    fds, hwpt, dev = tracked
    fds.tracking(hwpt, True)
    dev.dma_write(0x10000 + 80 * PG, 8)
    ioas = next(i for i, o in fds.h.kernel.file_of(fds.fd).objects.items()
                if type(o).__name__ == "Ioas")
    fds.unmap(ioas, 0x10000 + 80 * PG, 16 * PG)
    fds.map(ioas, 0x10000 + 80 * PG, 16 * PG)
    assert fds.dirty(hwpt, 0x10000, 96 * PG) == []


def test_fault_injection_on_an_iommufd_command(tracked) -> None:
    fds, hwpt, _ = tracked
    fds.tracking(hwpt, True)
    fds.k.faults.inject("ioctl:IOMMU_HWPT_GET_DIRTY_BITMAP", errno.EIO)
    assert errno_of(lambda: fds.dirty(hwpt, 0x10000, 64 * PG)) == errno.EIO
    assert fds.dirty(hwpt, 0x10000, 64 * PG) == []
