"""Type1 IOMMU of the simulated kernel: GET_INFO (two-call pattern, caps), MAP_DMA and
UNMAP_DMA with the checks and errno values of docs/kernel-contract.md §3.6 - §3.8."""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import vfiod.abi.vfio as v
from vfiod.abi.layout import parse_caps
from vfiod.errors import KernelError
from vfiod.kernel.sim import SimHost, SimHostConfig, Type1Config
from vfiod.kernel.sim.interfaces import DeviceParts, DeviceSpec
from vfiod.kernel.sim.rawvfio import RawVfio, map_dma, open_device, unmap_dma
from vfiod.kernel.sim.type1 import PAGE_MASK64

BDF = "0000:3b:00.1"
UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
MiB = 1 << 20
VA = 1 << 40           # never dereferenced: MAP_DMA only records it
RW = v.VFIO_DMA_MAP_FLAG_READ | v.VFIO_DMA_MAP_FLAG_WRITE


def build(tmp_path: Path, iommu: int = v.VFIO_TYPE1v2_IOMMU, mdev: bool = False,
          **type1: object) -> tuple[SimHost, RawVfio]:
    cfg = SimHostConfig(type1=Type1Config(**type1))  # type: ignore[arg-type]
    spec = DeviceSpec(UUID, kind="mdev") if mdev else DeviceSpec(BDF)
    h = SimHost.build(tmp_path, [[spec]], config=cfg, build_parts=lambda s, f: DeviceParts())
    return h, open_device(h.kernel, h.dev_root, 10, spec.name, iommu)


@pytest.fixture
def v2(tmp_path: Path):
    h, raw = build(tmp_path)
    yield h, raw
    raw.close()
    h.close()


def errno_of(call: Callable[..., object], *args: object, **kwargs: object) -> int:
    with pytest.raises(KernelError) as e:
        call(*args, **kwargs)
    return e.value.errno


def get_info(h: SimHost, raw: RawVfio) -> tuple[v.vfio_iommu_type1_info, bytearray]:
    """The two-call pattern, checked on the way."""
    first = v.vfio_iommu_type1_info(argsz=ctypes.sizeof(v.vfio_iommu_type1_info))
    h.kernel.ioctl(raw.container, v.VFIO_IOMMU_GET_INFO, first)
    assert first.flags & v.VFIO_IOMMU_INFO_CAPS and first.cap_offset == 0
    assert first.argsz > 24
    buf = bytearray(first.argsz)
    info = v.vfio_iommu_type1_info.from_buffer(buf)
    info.argsz = len(buf)
    h.kernel.ioctl(raw.container, v.VFIO_IOMMU_GET_INFO, buf)
    return info, buf


# -- GET_INFO ---------------------------------------------------------------------------------

def test_get_info_caps(v2) -> None:
    h, raw = v2
    map_dma(h.kernel, raw.container, 0, MiB, VA)
    info, buf = get_info(h, raw)
    assert info.flags == v.VFIO_IOMMU_INFO_PGSIZES | v.VFIO_IOMMU_INFO_CAPS
    assert info.iova_pgsizes == 0x40201000 and info.cap_offset == 24
    caps = parse_caps(buf, info.cap_offset, 24)
    assert [c[0] for c in caps] == [v.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION,
                                    v.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
                                    v.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE]
    assert all(off % 8 == 0 for _, _, off in caps)
    mig = v.vfio_iommu_type1_info_cap_migration.from_buffer_copy(buf, caps[0][2])
    assert (mig.flags, mig.pgsize_bitmap, mig.max_dirty_bitmap_size) == (0, 4096, 1 << 28)
    avail = v.vfio_iommu_type1_info_dma_avail.from_buffer_copy(buf, caps[1][2])
    assert avail.avail == 65535 - 1
    rng = v.vfio_iommu_type1_info_cap_iova_range.from_buffer_copy(buf, caps[2][2])
    assert rng.nr_iovas == 1
    start, end = struct.unpack_from("<QQ", buf, caps[2][2] + 16)
    assert (start, end) == (0, (1 << 48) - 1)


@pytest.mark.parametrize("argsz, copied", [(16, 16), (20, 20)])
def test_get_info_copies_back_only_what_argsz_allows(v2, argsz: int, copied: int) -> None:
    h, raw = v2
    buf = bytearray(b"\xaa" * 24)
    struct.pack_into("<I", buf, 0, argsz)
    h.kernel.ioctl(raw.container, v.VFIO_IOMMU_GET_INFO, buf)
    assert buf[copied:] == b"\xaa" * (24 - copied)
    argsz_out, flags, pgsizes = struct.unpack_from("<IIQ", buf)
    assert argsz_out > 24 and flags & v.VFIO_IOMMU_INFO_CAPS and pgsizes == 0x40201000
    if copied == 20:
        assert struct.unpack_from("<I", buf, 16)[0] == 0          # cap_offset zeroed


def test_get_info_short_argsz_is_einval(v2) -> None:
    h, raw = v2
    assert errno_of(lambda: h.kernel.ioctl(raw.container, v.VFIO_IOMMU_GET_INFO,
                                           v.vfio_iommu_type1_info(argsz=15))) == errno.EINVAL


def test_pre_66_caps_are_packed_at_4_byte_offsets(tmp_path: Path) -> None:
    h, raw = build(tmp_path, caps_align8=False)
    info, buf = get_info(h, raw)
    offsets = [off for _, _, off in parse_caps(buf, info.cap_offset, 24)]
    assert offsets == [24, 56, 68]             # DMA_AVAIL is 12 bytes, unpadded
    assert len(buf) == 68 + 32
    raw.close()


def test_mdev_only_container_reports_page_mask_and_no_iova_ranges(tmp_path: Path) -> None:
    h, raw = build(tmp_path, mdev=True)
    info, buf = get_info(h, raw)
    assert info.iova_pgsizes == PAGE_MASK64
    assert [c[0] for c in parse_caps(buf, info.cap_offset, 24)] == [
        v.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, v.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL]
    map_dma(h.kernel, raw.container, 1 << 60, MiB, VA)     # no range check without ranges
    raw.close()


# -- MAP_DMA ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argsz, flags, iova, size, vaddr", [
    (31, RW, 0, MiB, VA),                                     # argsz < 32
    (32, RW | 8, 0, MiB, VA),                                 # unknown flag
    (32, 0, 0, MiB, VA),                                      # neither READ/WRITE nor VADDR
    (32, RW | v.VFIO_DMA_MAP_FLAG_VADDR, 0, MiB, VA),         # both
    (32, RW, 0, 0, VA),                                       # size 0
    (32, RW, 0x800, MiB, VA),                                 # iova unaligned
    (32, RW, 0, MiB + 1, VA),                                 # size unaligned
    (32, RW, 0, MiB, VA + 4),                                 # vaddr unaligned
    (32, RW, (1 << 64) - 4096, 8192, VA),                     # iova wraps
    (32, RW, 0, 8192, (1 << 64) - 4096),                      # vaddr wraps
    (32, RW, 1 << 48, MiB, VA),                               # outside the IOVA range
])
def test_map_dma_rejects(v2, argsz: int, flags: int, iova: int, size: int, vaddr: int) -> None:
    h, raw = v2
    arg = v.vfio_iommu_type1_dma_map(argsz=argsz, flags=flags, vaddr=vaddr, iova=iova,
                                     size=size)
    assert errno_of(lambda: h.kernel.ioctl(raw.container, v.VFIO_IOMMU_MAP_DMA, arg)) \
        == errno.EINVAL


def test_map_dma_overlap_is_eexist(v2) -> None:
    h, raw = v2
    map_dma(h.kernel, raw.container, 4 * MiB, 2 * MiB, VA)
    for iova, size in ((4 * MiB, 4096), (3 * MiB, 2 * MiB), (5 * MiB, 4 * MiB), (0, 16 * MiB)):
        assert errno_of(map_dma, h.kernel, raw.container, iova, size, VA) == errno.EEXIST
    map_dma(h.kernel, raw.container, 6 * MiB, MiB, VA)            # adjacent is fine
    map_dma(h.kernel, raw.container, 3 * MiB, MiB, VA)


def test_map_dma_limit_is_enospc(tmp_path: Path) -> None:
    h, raw = build(tmp_path, dma_entry_limit=2)
    map_dma(h.kernel, raw.container, 0, 4096, VA)
    map_dma(h.kernel, raw.container, 8192, 4096, VA)
    assert errno_of(lambda: map_dma(h.kernel, raw.container, 16384, 4096, VA)) == errno.ENOSPC
    unmap_dma(h.kernel, raw.container, 0, 4096)
    map_dma(h.kernel, raw.container, 16384, 4096, VA)
    raw.close()


def test_map_dma_outside_a_hole_in_the_iova_ranges(tmp_path: Path) -> None:
    ranges = ((0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1))      # the x86 MSI window
    h, raw = build(tmp_path, iova_ranges=ranges)
    map_dma(h.kernel, raw.container, 0, 0xFEE00000, VA)
    assert errno_of(lambda: map_dma(h.kernel, raw.container, 0xFEE00000, 4096, VA)) \
        == errno.EINVAL
    map_dma(h.kernel, raw.container, 1 << 32, 1 << 30, VA)
    raw.close()


def test_map_dma_past_memlock_is_enomem(tmp_path: Path) -> None:
    cfg = SimHostConfig(memlock_limit=4 * MiB)
    h = SimHost.build(tmp_path, [[DeviceSpec(BDF)]], config=cfg,
                      build_parts=lambda s, f: DeviceParts())
    raw = open_device(h.kernel, h.dev_root, 10, BDF)
    map_dma(h.kernel, raw.container, 0, 3 * MiB, VA)
    assert errno_of(lambda: map_dma(h.kernel, raw.container, 4 * MiB, 2 * MiB, VA)) \
        == errno.ENOMEM
    unmap_dma(h.kernel, raw.container, 0, 3 * MiB)
    map_dma(h.kernel, raw.container, 4 * MiB, 4 * MiB, VA)
    assert h.kernel.locked_bytes == 4 * MiB
    raw.close()
    assert h.kernel.locked_bytes == 0          # released with the container's IOMMU


# -- UNMAP_DMA ---------------------------------------------------------------------------------------

def unmap_errno(h: SimHost, raw: RawVfio, iova: int, size: int, flags: int = 0,
                argsz: int = 24) -> int:
    arg = v.vfio_iommu_type1_dma_unmap(argsz=argsz, flags=flags, iova=iova, size=size)
    return errno_of(lambda: h.kernel.ioctl(raw.container, v.VFIO_IOMMU_UNMAP_DMA, arg))


def test_unmap_dma_rejects(v2) -> None:
    h, raw = v2
    map_dma(h.kernel, raw.container, 2 * MiB, 2 * MiB, VA)
    all_, bitmap = v.VFIO_DMA_UNMAP_FLAG_ALL, v.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
    assert unmap_errno(h, raw, 2 * MiB, 2 * MiB, argsz=23) == errno.EINVAL
    assert unmap_errno(h, raw, 2 * MiB, 2 * MiB, flags=8) == errno.EINVAL
    assert unmap_errno(h, raw, 0, 0, flags=all_ | bitmap, argsz=48) == errno.EINVAL
    assert unmap_errno(h, raw, 2 * MiB, 0, flags=all_) == errno.EINVAL
    assert unmap_errno(h, raw, 0, 4096, flags=all_) == errno.EINVAL
    assert unmap_errno(h, raw, 2 * MiB, 0) == errno.EINVAL
    assert unmap_errno(h, raw, 2 * MiB + 1, 4096) == errno.EINVAL
    assert unmap_errno(h, raw, 2 * MiB, 4095) == errno.EINVAL
    # type1v2 never bisects: start inside, end inside
    assert unmap_errno(h, raw, 3 * MiB, 2 * MiB) == errno.EINVAL
    assert unmap_errno(h, raw, MiB, 2 * MiB) == errno.EINVAL
    assert unmap_dma(h.kernel, raw.container, 2 * MiB, 2 * MiB) == 2 * MiB


def test_unmap_dma_reports_what_it_unmapped(v2) -> None:
    h, raw = v2
    k = h.kernel
    map_dma(k, raw.container, 0, MiB, VA)
    map_dma(k, raw.container, 2 * MiB, MiB, VA)
    map_dma(k, raw.container, 8 * MiB, MiB, VA)
    assert unmap_dma(k, raw.container, 16 * MiB, MiB) == 0           # nothing there: success
    assert unmap_dma(k, raw.container, 0, 4 * MiB) == 2 * MiB
    assert unmap_dma(k, raw.container, 0, 0, v.VFIO_DMA_UNMAP_FLAG_ALL) == MiB
    map_dma(k, raw.container, 0, MiB, VA)                             # all gone


def test_type1_v1_unmaps_whole_mappings(tmp_path: Path) -> None:
    h, raw = build(tmp_path, iommu=v.VFIO_TYPE1_IOMMU)
    k = h.kernel
    map_dma(k, raw.container, 0, 2 * MiB, VA)
    map_dma(k, raw.container, 4 * MiB, 2 * MiB, VA)
    assert unmap_dma(k, raw.container, MiB, MiB) == 0           # starts inside: stops there
    assert unmap_dma(k, raw.container, 4 * MiB, 4096) == 2 * MiB  # the whole mapping goes
    assert unmap_dma(k, raw.container, 0, 4096) == 2 * MiB
    raw.close()


def test_update_vaddr_cycle(v2) -> None:
    h, raw = v2
    k = h.kernel
    dev = h.device(BDF)
    map_dma(k, raw.container, 0, MiB, VA)
    vaddr_flag = v.VFIO_DMA_UNMAP_FLAG_VADDR
    assert unmap_dma(k, raw.container, 0, MiB, vaddr_flag) == MiB
    assert unmap_errno(h, raw, 0, MiB, flags=vaddr_flag) == errno.EINVAL     # already invalid
    with pytest.raises(KernelError) as e:
        dev.dma_write(0, 8)                 # a device DMA while the vaddr is invalid
    assert e.value.errno == errno.EFAULT
    map_vaddr = v.VFIO_DMA_MAP_FLAG_VADDR
    assert errno_of(lambda: map_dma(k, raw.container, MiB, MiB, VA, map_vaddr)) == errno.ENOENT
    assert errno_of(lambda: map_dma(k, raw.container, 0, 4096, VA, map_vaddr)) == errno.EINVAL
    map_dma(k, raw.container, 0, MiB, VA + MiB, map_vaddr)
    dev.dma_write(0, 8)
    assert errno_of(lambda: map_dma(k, raw.container, 0, MiB, VA, map_vaddr)) == errno.EINVAL


def test_dma_write_lands_in_the_mapped_memory(v2) -> None:
    h, raw = v2
    k = h.kernel
    ram = bytearray(4 * 4096)
    base = ctypes.addressof((ctypes.c_char * len(ram)).from_buffer(ram))
    page = base + (-base) % 4096                   # page-aligned start inside ram
    map_dma(k, raw.container, 0x10000, 2 * 4096, page)
    h.device(BDF).dma_write(0x10000 + 4090, 10, b"0123456789")
    off = page - base
    assert bytes(ram[off + 4090:off + 4100]) == b"0123456789"
    for iova in (0x0, 0x10000 + 2 * 4096 - 4):
        with pytest.raises(KernelError) as e:
            h.device(BDF).dma_write(iova, 8)
        assert e.value.errno == errno.EFAULT


def test_dma_write_to_a_read_only_mapping_faults(v2) -> None:
    h, raw = v2
    map_dma(h.kernel, raw.container, 0, 4096, VA, v.VFIO_DMA_MAP_FLAG_READ)
    with pytest.raises(KernelError) as e:
        h.device(BDF).dma_write(0, 8)
    assert e.value.errno == errno.EFAULT


def test_dma_write_bad_arguments(v2) -> None:
    h, _ = v2
    with pytest.raises(ValueError):
        h.device(BDF).dma_write(0, 0)
    with pytest.raises(ValueError):
        h.device(BDF).dma_write(0, 4, b"abc")
