"""Pure helpers of vfiod.abi (no headers needed): capability-chain parsing on crafted
buffers (docs/kernel-contract.md §0, §3.4, §3.6), feature buffers (§6.1), flexible-array buffers,
offsetofend, the v2 state enum and the per-fd ioctl tables (§2)."""

from __future__ import annotations

import ctypes
import struct

import pytest

import vfiod.abi.iommufd as iommufd
import vfiod.abi.v1 as v1
import vfiod.abi.vfio as vfio
from vfiod.abi.ioctl import ioctl_nr, ioctl_type, is_plain_io
from vfiod.abi.layout import flex_array, flex_buffer, flex_size, offsetofend, parse_caps


def _cap(cap_id: int, version: int, nxt: int, body: bytes = b"") -> bytes:
    return struct.pack("=HHI", cap_id, version, nxt) + body


# -- parse_caps -------------------------------------------------------------------------
def test_parse_caps_pre_6_6_type1_chain_at_4_byte_offsets() -> None:
    # A 6.1-era VFIO_IOMMU_GET_INFO answer: caps follow the 24-byte info in the order
    # MIGRATION (32 bytes), DMA_AVAIL (12, unpadded), IOVA_RANGE - so the last one sits
    # at offset 68, 4- but not 8-byte aligned.
    mig = _cap(vfio.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, 1, 56,
               struct.pack("=I4xQQ", 0, 0x1000, 1 << 28))
    avail = _cap(vfio.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 1, 68, struct.pack("=I", 65535))
    iova = _cap(vfio.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, 0,
                struct.pack("=II", 1, 0) + struct.pack("=QQ", 0, (1 << 39) - 1))
    info = vfio.vfio_iommu_type1_info(argsz=24 + len(mig) + len(avail) + len(iova),
                                      flags=vfio.VFIO_IOMMU_INFO_CAPS, cap_offset=24)
    buf = bytes(info) + mig + avail + iova
    caps = parse_caps(buf, info.cap_offset, header_size=ctypes.sizeof(info))
    assert caps == [(2, 1, 24), (3, 1, 56), (1, 1, 68)]
    got_avail = vfio.vfio_iommu_type1_info_dma_avail.from_buffer_copy(buf, 56)
    assert got_avail.avail == 65535
    got_mig = vfio.vfio_iommu_type1_info_cap_migration.from_buffer_copy(buf, 24)
    assert (got_mig.pgsize_bitmap, got_mig.max_dirty_bitmap_size) == (0x1000, 1 << 28)
    head = vfio.vfio_iommu_type1_info_cap_iova_range.from_buffer_copy(buf, 68)
    ranges = flex_array(vfio.vfio_iommu_type1_info_cap_iova_range, buf, head.nr_iovas, 68)
    assert (ranges[0].start, ranges[0].end) == (0, (1 << 39) - 1)


def test_parse_caps_region_chain_after_20_byte_device_info() -> None:
    # 6.1's vfio_device_info is 20 bytes: its first cap starts at offset 20.
    ctype = _cap(vfio.VFIO_REGION_INFO_CAP_TYPE, 1, 36,
                 struct.pack("=II", v1.VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
                             v1.VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED))
    msix = _cap(vfio.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1, 0)
    buf = bytes(20) + ctype + msix
    assert parse_caps(buf, 20, header_size=20) == [(2, 1, 20), (3, 1, 36)]


def test_parse_caps_no_caps() -> None:
    assert parse_caps(bytes(32), 0) == []


@pytest.mark.parametrize("chain, first, where", [
    pytest.param([(32, 40), (40, 32)], 32, "loops back to offset 32", id="two-cap-loop"),
    pytest.param([(32, 32)], 32, "loops back to offset 32", id="self-loop"),
])
def test_parse_caps_rejects_loops(chain: list[tuple[int, int]], first: int,
                                  where: str) -> None:
    buf = bytearray(64)
    for off, nxt in chain:
        buf[off:off + 8] = _cap(1, 1, nxt)
    with pytest.raises(ValueError, match=where):
        parse_caps(buf, first)


@pytest.mark.parametrize("first, nxt, message", [
    pytest.param(64, 0, "offset 64 is outside the 64-byte buffer", id="first-past-end"),
    pytest.param(60, 0, "offset 60 is outside the 64-byte buffer", id="header-truncated"),
    pytest.param(32, 4096, "offset 4096 is outside the 64-byte buffer", id="next-past-end"),
    pytest.param(34, 0, "offset 34 is not 4-byte aligned", id="unaligned"),
    pytest.param(8, 0, "offset 8 lies inside the 32-byte info struct", id="inside-info"),
])
def test_parse_caps_rejects_bad_offsets(first: int, nxt: int, message: str) -> None:
    buf = bytearray(64)
    if first + 8 <= len(buf):
        buf[first:first + 8] = _cap(1, 1, nxt)
    with pytest.raises(ValueError, match=message):
        parse_caps(buf, first, header_size=32)


# -- feature_buffer ---------------------------------------------------------------------
def test_feature_buffer_layout() -> None:
    buf = vfio.feature_buffer(vfio.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                              vfio.VFIO_DEVICE_FEATURE_SET,
                              ctypes.sizeof(vfio.vfio_device_feature_mig_state))
    assert len(buf) == 16
    argsz, flags = struct.unpack_from("=II", buf)
    assert argsz == 16
    assert flags == vfio.VFIO_DEVICE_FEATURE_SET | 2
    payload = vfio.vfio_device_feature_mig_state.from_buffer(buf, vfio.FEATURE_HEADER_SIZE)
    payload.device_state = vfio.MigState.PRE_COPY
    payload.data_fd = -1
    assert struct.unpack_from("=Ii", buf, 8) == (6, -1)


def test_feature_buffer_probe_without_payload() -> None:
    flags = vfio.VFIO_DEVICE_FEATURE_PROBE | vfio.VFIO_DEVICE_FEATURE_SET
    buf = vfio.feature_buffer(vfio.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, flags, 0)
    assert bytes(buf) == struct.pack("=II", 8, flags | 6)


@pytest.mark.parametrize("fid, flags, size, message", [
    (0x10000, vfio.VFIO_DEVICE_FEATURE_GET, 8, "feature id 65536 is outside"),
    (-1, vfio.VFIO_DEVICE_FEATURE_GET, 8, "feature id -1 is outside"),
    (1, 1 << 19, 8, "outside GET|SET|PROBE"),
    (1, vfio.VFIO_DEVICE_FEATURE_GET | 5, 8, "outside GET|SET|PROBE"),
    (1, vfio.VFIO_DEVICE_FEATURE_GET, -8, "negative feature payload size -8"),
])
def test_feature_buffer_rejects_bad_input(fid: int, flags: int, size: int,
                                          message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vfio.feature_buffer(fid, flags, size)


# -- flexible arrays and offsetofend ----------------------------------------------------
def test_flex_buffer_sets_argsz_and_fields() -> None:
    buf, head = flex_buffer(vfio.vfio_iommu_type1_dirty_bitmap, 40,
                            flags=vfio.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP)
    assert len(buf) == 48 and head.argsz == 48
    get = vfio.vfio_iommu_type1_dirty_bitmap_get.from_buffer(buf, 8)
    get.bitmap.pgsize = 4096
    assert struct.unpack_from("=IIQQQ", buf)[:2] == (48, 4)
    assert struct.unpack_from("=Q", buf, 8 + 16)[0] == 4096


def test_flex_buffer_iommufd_size_and_sparse_areas() -> None:
    buf, head = flex_buffer(vfio.vfio_region_info_cap_sparse_mmap, 2, nr_areas=2)
    assert len(buf) == 16 + 2 * 16 == flex_size(vfio.vfio_region_info_cap_sparse_mmap, 2)
    assert head.nr_areas == 2
    areas = flex_array(vfio.vfio_region_info_cap_sparse_mmap, buf, 2)
    areas[1].offset = 0x3000
    assert struct.unpack_from("=Q", buf, 32)[0] == 0x3000


def test_flex_helpers_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="has no field 'bogus'"):
        flex_buffer(vfio.vfio_irq_set, 1, bogus=1)
    with pytest.raises(ValueError, match="negative element count -1"):
        flex_size(vfio.vfio_irq_set, -1)
    with pytest.raises(TypeError, match="vfio_region_info has no flexible array tail"):
        flex_size(vfio.vfio_region_info, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"areas\[3\] at offset 0 needs 64 bytes, "
                                         r"buffer has 48"):
        flex_array(vfio.vfio_region_info_cap_sparse_mmap, bytes(48), 3)


def test_offsetofend_is_the_kernels_minimum_argsz() -> None:
    assert offsetofend(vfio.vfio_device_info, "num_irqs") == 16
    assert offsetofend(vfio.vfio_device_info, "cap_offset") == 20
    assert offsetofend(vfio.vfio_precopy_info, "dirty_bytes") == 24
    assert offsetofend(iommufd.iommu_hwpt_get_dirty_bitmap, "data") == 48
    with pytest.raises(ValueError, match="vfio_device_info has no field 'nope'"):
        offsetofend(vfio.vfio_device_info, "nope")


# -- states and tables ------------------------------------------------------------------
def test_mig_state_enum_matches_the_kernel_ints() -> None:
    assert vfio.MigState is vfio.vfio_device_mig_state
    assert [m.name for m in vfio.MigState] == [
        "ERROR", "STOP", "RUNNING", "STOP_COPY", "RESUMING", "RUNNING_P2P", "PRE_COPY",
        "PRE_COPY_P2P"]
    for m in vfio.MigState:
        assert getattr(vfio, f"VFIO_DEVICE_STATE_{m.name}") == m.value
    assert len(vfio.MigState) == vfio.VFIO_DEVICE_STATE_NR


def test_v1_names_differ_from_v2_names() -> None:
    # The name trap of §5.3: v1 STOP/RUNNING bits are not the v2 STOP/RUNNING values.
    assert (v1.V1_STATE_STOP, v1.V1_STATE_RUNNING) == (0, 1)
    assert (vfio.VFIO_DEVICE_STATE_STOP, vfio.VFIO_DEVICE_STATE_RUNNING) == (1, 2)
    assert v1.v1_state_is_error(v1.V1_STATE_ERROR | 0x80)
    assert not v1.v1_state_valid(v1.V1_STATE_RESUMING | v1.V1_STATE_RUNNING)


@pytest.mark.parametrize("table, module, count", [
    (vfio.CONTAINER_IOCTLS, vfio, 9), (vfio.GROUP_IOCTLS, vfio, 4),
    (vfio.DEVICE_IOCTLS, vfio, 12), (vfio.MIG_DATA_IOCTLS, vfio, 1),
    (iommufd.IOMMUFD_IOCTLS, iommufd, 13),
], ids=["container", "group", "device", "mig-data", "iommufd"])
def test_ioctl_tables_have_no_collisions(table: dict[int, str], module: object,
                                         count: int) -> None:
    # A dict literal silently drops a repeated key: a count short of the names written
    # means two requests on one fd kind share a number.
    assert len(table) == count
    for number, name in table.items():
        assert getattr(module, name) == number
        assert is_plain_io(number) and ioctl_type(number) == ord(";")


def test_reused_numbers_across_fd_kinds() -> None:
    # §0: the same request number means different things on different fds.
    assert vfio.VFIO_IOMMU_GET_INFO == vfio.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO == 0x3B70
    assert vfio.VFIO_IOMMU_DIRTY_PAGES == vfio.VFIO_DEVICE_FEATURE == 0x3B75
    assert ioctl_nr(vfio.VFIO_MIG_GET_PRECOPY_INFO) == 121
