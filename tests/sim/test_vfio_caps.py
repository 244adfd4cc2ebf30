"""Capability-chain decoding of region info and type1 IOMMU info against hand-built kernel
answers: pre-6.6 layouts (4-byte aligned capabilities), unknown ids, and malformed chains
that must fail with a clear EPROTO naming the ioctl, never a crash or a hang.

A scripted ``KernelOps`` plays the kernel's side of the two-call pattern (docs/kernel-contract.md
§3.4): if the caller's argsz is too small it raises argsz, sets CAPS, leaves cap_offset 0
and succeeds; otherwise it copies the whole answer.
"""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

import vfiod.abi.vfio as v
from vfiod.errors import KernelError
from vfiod.vfio.device import Device
from vfiod.vfio.iommu_info import query_iommu_info


class ScriptedKernel:
    """Answers one info ioctl with fixed bytes; records the argsz of every call."""

    def __init__(self, request: int, answer: bytes) -> None:
        self.request = request
        self.answer = answer
        self.argszs: list[int] = []

    def ioctl(self, fd: int, request: int, arg: object = 0, label: str = "",
              target: str = "") -> int:
        assert request == self.request
        view = memoryview(arg).cast("B")  # type: ignore[arg-type]
        argsz = struct.unpack_from("=I", view, 0)[0]
        self.argszs.append(argsz)
        if argsz < len(self.answer):
            fixed = bytearray(self.answer[:len(view)])
            struct.pack_into("=I", fixed, 0, len(self.answer))        # argsz: what is needed
            flags = struct.unpack_from("=I", fixed, 4)[0]
            caps_flag = (v.VFIO_REGION_INFO_FLAG_CAPS if request == v.VFIO_DEVICE_GET_REGION_INFO
                         else v.VFIO_IOMMU_INFO_CAPS)
            struct.pack_into("=I", fixed, 4, flags | caps_flag)
            cap_off_at = 12 if request == v.VFIO_DEVICE_GET_REGION_INFO else 16
            struct.pack_into("=I", fixed, cap_off_at, 0)
            view[:len(fixed)] = fixed
        else:
            view[:len(self.answer)] = self.answer
        return 0


def _cap(cap_id: int, version: int, body: bytes, nxt: int) -> bytes:
    return struct.pack("=HHI", cap_id, version, nxt) + body


def _region_answer(caps: list[tuple[int, bytes]], index: int = 9, align: int = 4,
                   override_first: int | None = None) -> bytes:
    """vfio_region_info + chained capabilities, each starting at an ``align`` boundary."""
    head = 32
    offsets, pos = [], head
    for _cid, body in caps:
        offsets.append(pos)
        pos += 8 + len(body)
        pos = -(-pos // align) * align
    out = bytearray(pos)
    for i, (cid, body) in enumerate(caps):
        nxt = offsets[i + 1] if i + 1 < len(caps) else 0
        blob = _cap(cid, 1, body, nxt)
        out[offsets[i]:offsets[i] + len(blob)] = blob
    first = override_first if override_first is not None else (offsets[0] if caps else 0)
    flags = v.VFIO_REGION_INFO_FLAG_READ | v.VFIO_REGION_INFO_FLAG_MMAP | \
        (v.VFIO_REGION_INFO_FLAG_CAPS if caps else 0)
    struct.pack_into("=IIIIQQ", out, 0, len(out), flags, index, first, 0x2000, 0x90000000000)
    return bytes(out)


def _device(answer: bytes) -> tuple[Device, ScriptedKernel]:
    k = ScriptedKernel(v.VFIO_DEVICE_GET_REGION_INFO, answer)
    return Device(k, 5, "0000:3b:00.1"), k  # type: ignore[arg-type]


TYPE_BODY = struct.pack("=II", 3, 1)                       # v1 migration region type
SPARSE_BODY = struct.pack("=II", 2, 0) + struct.pack("=QQQQ", 0, 0x1000, 0x1800, 0x800)


def test_two_call_region_info_with_unaligned_caps() -> None:
    # TYPE is 16 bytes, sparse 40: with 4-byte alignment the sparse cap starts at 48 and
    # a 12-byte MSIX_MAPPABLE-like unknown cap follows at an offset that is 4 mod 8.
    answer = _region_answer([(v.VFIO_REGION_INFO_CAP_TYPE, TYPE_BODY),
                             (v.VFIO_REGION_INFO_CAP_SPARSE_MMAP, SPARSE_BODY),
                             (77, b"\x01\x02\x03\x04")])
    dev, k = _device(answer)
    r = dev.region_info(9)
    assert k.argszs == [ctypes.sizeof(v.vfio_region_info), len(answer)]
    assert (r.type, r.subtype) == (3, 1)
    assert r.sparse == ((0, 0x1000), (0x1800, 0x800))
    assert r.cap_ids == (v.VFIO_REGION_INFO_CAP_TYPE, v.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 77)
    assert (r.size, r.offset) == (0x2000, 0x90000000000)
    assert r.mmap_areas() == ((0, 0x1000), (0x1800, 0x800))
    assert dev.region_info(9) is r and len(k.argszs) == 2      # cached


def test_region_without_caps_needs_one_call() -> None:
    dev, k = _device(_region_answer([]))
    r = dev.region_info(9)
    assert r.sparse is None and r.type is None and len(k.argszs) == 1
    assert r.mmap_areas() == ((0, 0x2000),)


@pytest.mark.parametrize("answer,why", [
    (_region_answer([(2, TYPE_BODY)], override_first=48), "offset 48 is outside"),
    (_region_answer([(2, TYPE_BODY)], override_first=8), "inside the 32-byte"),
    (_region_answer([(2, TYPE_BODY)], override_first=34), "not 4-byte aligned"),
    # sparse cap claiming 5 areas but carrying 2
    (_region_answer([(1, struct.pack("=II", 5, 0) + SPARSE_BODY[8:])]), "areas"),
], ids=["past-end", "inside-info", "unaligned", "short-sparse"])
def test_malformed_region_chain_is_eproto(answer: bytes, why: str) -> None:
    dev, _ = _device(answer)
    with pytest.raises(KernelError) as ei:
        dev.region_info(9)
    assert ei.value.errno == errno.EPROTO
    assert str(ei.value).startswith("VFIO_DEVICE_GET_REGION_INFO(index 9) on 0000:3b:00.1: "
                                    "EPROTO")
    assert why in str(ei.value)


def test_looping_region_chain_is_eproto() -> None:
    answer = bytearray(_region_answer([(2, TYPE_BODY), (2, TYPE_BODY)]))
    struct.pack_into("=I", answer, 48 + 4, 32)         # second cap points back to the first
    dev, _ = _device(bytes(answer))
    with pytest.raises(KernelError, match="loops back to offset 32"):
        dev.region_info(9)


def _iommu_answer(caps: list[tuple[int, bytes]]) -> bytes:
    head = 24
    offsets, pos = [], head
    for _cid, body in caps:
        offsets.append(pos)
        pos += 8 + len(body)                           # pre-6.6: no padding to 8
    out = bytearray(pos)
    for i, (cid, body) in enumerate(caps):
        nxt = offsets[i + 1] if i + 1 < len(caps) else 0
        blob = _cap(cid, 1, body, nxt)
        out[offsets[i]:offsets[i] + len(blob)] = blob
    flags = v.VFIO_IOMMU_INFO_PGSIZES | (v.VFIO_IOMMU_INFO_CAPS if caps else 0)
    struct.pack_into("=IIQII", out, 0, len(out), flags, 0x40201000, offsets[0] if caps else 0, 0)
    return bytes(out)


def test_iommu_info_native_type1_order_pre_6_6() -> None:
    # MIGRATION (32), DMA_AVAIL (12: next cap at a 4 mod 8 offset), IOVA_RANGE (2 ranges)
    mig = struct.pack("=IIQQ", 0, 0xDEAD, 0x1000, 1 << 28)    # hole holds stack garbage
    avail = struct.pack("=I", 65535)
    iova = struct.pack("=II", 2, 0) + struct.pack("=QQQQ", 0, 0xFEDFFFFF, 0xFEF00000,
                                                  (1 << 48) - 1)
    answer = _iommu_answer([(v.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, mig),
                            (v.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, avail),
                            (v.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, iova)])
    k = ScriptedKernel(v.VFIO_IOMMU_GET_INFO, answer)
    info = query_iommu_info(k, 3, "container /dev/vfio/vfio")  # type: ignore[arg-type]
    assert k.argszs == [24, len(answer)]
    assert info.min_pgsize == 0x1000
    assert info.dirty is not None and info.dirty.pgsize == 0x1000
    assert info.dirty.max_dirty_bitmap_size == 1 << 28
    assert info.dma_avail == 65535
    assert info.iova_ranges == ((0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1))


def test_iommufd_compat_container_has_no_dirty_cap() -> None:
    answer = _iommu_answer([(v.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, struct.pack("=I", 0xFFFFFFFF))])
    info = query_iommu_info(ScriptedKernel(v.VFIO_IOMMU_GET_INFO, answer), 3,  # type: ignore[arg-type]
                            "container")
    assert info.dirty is None and info.dma_avail == 0xFFFFFFFF and info.iova_ranges == ()
