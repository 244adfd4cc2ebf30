"""The simulated v1 migration region (docs/kernel-contract.md §3.4, §5): discovery through
REGION_INFO capabilities, register access rules, device_state bit rules, the save and
resume loops by pread/pwrite and by mmap, the error state and reset."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

import vfiod.abi.v1 as v1
import vfiod.abi.vfio as v
from tests.support.sim_mig_rig import Dev, RigFactory, make_rigs, specs, twin
from vfiod.abi.layout import flex_array, parse_caps
from vfiod.errors import KernelError
from vfiod.kernel.sim.migration.specs import V1_RESERVED

U32, U64 = struct.Struct("<I"), struct.Struct("<Q")
RUN, SAVE, RESUME = v1.V1_STATE_RUNNING, v1.V1_STATE_SAVING, v1.V1_STATE_RESUMING


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[RigFactory]:
    yield from make_rigs(tmp_path)


class Region:
    """The v1 region of one device, found like a client would (§5.1)."""

    def __init__(self, d: Dev) -> None:
        self.d = d
        k = d.kernel
        info = v.vfio_device_info(argsz=ctypes.sizeof(v.vfio_device_info))
        k.ioctl(d.fd, v.VFIO_DEVICE_GET_INFO, info)
        found = None
        for index in range(v.VFIO_PCI_NUM_REGIONS, info.num_regions):
            ri = v.vfio_region_info(argsz=32, index=index)
            k.ioctl(d.fd, v.VFIO_DEVICE_GET_REGION_INFO, ri)
            buf = bytearray(ri.argsz)
            full = v.vfio_region_info.from_buffer(buf)
            full.argsz, full.index = ri.argsz, index
            k.ioctl(d.fd, v.VFIO_DEVICE_GET_REGION_INFO, buf)
            caps = {cid: off for cid, _, off in parse_caps(buf, full.cap_offset, 32)}
            t = v.vfio_region_info_cap_type.from_buffer_copy(
                buf, caps[v.VFIO_REGION_INFO_CAP_TYPE])
            if (t.type, t.subtype) == (v1.VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
                                       v1.VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED):
                found = (full.flags, full.size, full.offset, buf, caps)
        assert found is not None, "no v1 migration region"
        self.flags, self.size, self.offset, buf, caps = found
        sp_off = caps[v.VFIO_REGION_INFO_CAP_SPARSE_MMAP]
        sp = v.vfio_region_info_cap_sparse_mmap.from_buffer_copy(buf, sp_off)
        self.areas = [(a.offset, a.size) for a in
                      flex_array(v.vfio_region_info_cap_sparse_mmap, bytes(buf), sp.nr_areas,
                                 sp_off)]

    def rd(self, off: int, width: int) -> int:
        fmt = U32 if width == 4 else U64
        return int(fmt.unpack(self.d.kernel.pread(self.d.fd, width, self.offset + off))[0])

    def wr(self, off: int, width: int, value: int) -> None:
        fmt = U32 if width == 4 else U64
        self.d.kernel.pwrite(self.d.fd, fmt.pack(value), self.offset + off)

    @property
    def state(self) -> int:
        return self.rd(0, 4)

    def set(self, bits: int) -> None:
        """Read-modify-write, as QEMU does (§5.5 'reserved bits')."""
        self.wr(0, 4, (self.state & ~v1.V1_STATE_MASK) | bits)

    def save_loop(self, use_mmap: bool = False) -> bytes:
        """§5.5 until pending_bytes is 0."""
        out = bytearray()
        window = self.d.kernel.mmap(self.d.fd, self.areas[0][1],
                                    self.offset + self.areas[0][0]) if use_mmap else None
        try:
            while self.rd(8, 8):
                data_offset = self.rd(16, 8)
                size = self.rd(24, 8)
                if window is not None:
                    out += window[data_offset - self.areas[0][0]:][:size]
                else:
                    out += self.d.kernel.pread(self.d.fd, size, self.offset + data_offset)
        finally:
            if window is not None:
                window.close()
        return bytes(out)

    def resume_loop(self, stream: bytes, chunk: int, use_mmap: bool = False) -> None:
        """§5.6: data_offset, write the chunk, write data_size."""
        window = self.d.kernel.mmap(self.d.fd, self.areas[0][1],
                                    self.offset + self.areas[0][0]) if use_mmap else None
        try:
            for i in range(0, len(stream), chunk):
                piece = stream[i:i + chunk]
                data_offset = self.rd(16, 8)
                if window is not None:
                    start = data_offset - self.areas[0][0]
                    window[start:start + len(piece)] = piece
                else:
                    self.d.kernel.pwrite(self.d.fd, piece, self.offset + data_offset)
                self.wr(24, 8, len(piece))
        finally:
            if window is not None:
                window.close()


def err(fn, *args) -> int:
    with pytest.raises(KernelError) as e:
        fn(*args)
    return e.value.errno


@pytest.fixture
def pair(rig: RigFactory) -> tuple[Region, Region]:
    spec = specs()["v1"]
    r = rig(spec, twin(spec))
    return Region(r[spec.name]), Region(r["0000:99:00.0"])


def test_region_discovery(pair: tuple[Region, Region]) -> None:
    src, _ = pair
    f = v.VFIO_REGION_INFO_FLAG_READ | v.VFIO_REGION_INFO_FLAG_WRITE \
        | v.VFIO_REGION_INFO_FLAG_MMAP | v.VFIO_REGION_INFO_FLAG_CAPS
    assert src.flags == f
    (area,) = src.areas
    assert area[0] > 0 and area[0] % 4096 == 0 and area[0] + area[1] == src.size
    assert src.rd(16, 8) == area[0]              # data_offset is the sparse mmap area
    assert src.state == V1_RESERVED | RUN        # reserved bits reported, RUNNING


@pytest.mark.parametrize("off,width", [(0, 8), (0, 2), (2, 4), (8, 4), (12, 4), (16, 4),
                                       (20, 8), (24, 4), (28, 4), (32, 4), (40, 8)])
def test_registers_need_exact_width_at_natural_offset(pair: tuple[Region, Region], off: int,
                                                      width: int) -> None:
    src, _ = pair
    k, fd = src.d.kernel, src.d.fd
    assert err(k.pread, fd, width, src.offset + off) == errno.EINVAL
    assert err(k.pwrite, fd, b"\0" * width, src.offset + off) == errno.EINVAL
    assert src.state == V1_RESERVED | RUN


def test_read_only_registers_and_ignored_reserved(pair: tuple[Region, Region]) -> None:
    src, _ = pair
    assert err(src.wr, 8, 8, 5) == errno.EINVAL          # pending_bytes
    assert err(src.wr, 16, 8, 5) == errno.EINVAL         # data_offset
    src.wr(4, 4, 0xFFFF)                                 # reserved: ignored
    assert src.rd(4, 4) == 0
    assert err(src.wr, 24, 8, 5) == errno.EINVAL         # data_size outside RESUMING


@pytest.mark.parametrize("bits", [RESUME | RUN, RESUME | SAVE | RUN, v1.V1_STATE_ERROR])
def test_invalid_and_driver_only_states(pair: tuple[Region, Region], bits: int) -> None:
    src, _ = pair
    assert err(src.set, bits) == errno.EINVAL
    assert src.state == V1_RESERVED | RUN


def test_reserved_bits_must_be_preserved(pair: tuple[Region, Region]) -> None:
    src, _ = pair
    assert err(src.wr, 0, 4, SAVE | RUN) == errno.EINVAL        # a blind write
    assert err(src.wr, 0, 4, V1_RESERVED | 1 << 20 | RUN) == errno.EINVAL
    src.set(SAVE | RUN)                                          # RMW works
    assert src.state == V1_RESERVED | SAVE | RUN


@pytest.mark.parametrize("use_mmap", [False, True])
@pytest.mark.parametrize("precopy", [False, True])
def test_save_and_resume_loops_restore_equal_state(pair: tuple[Region, Region], use_mmap: bool,
                                                   precopy: bool) -> None:
    src, dst = pair
    src.d.model.tick(4)
    stream = bytearray()
    if precopy:
        src.set(SAVE | RUN)                       # 001 -> 011
        stream += src.save_loop(use_mmap)
        src.d.model.tick(2)                       # still running: new dirty data
        assert src.rd(8, 8) > 0
        stream += src.save_loop(use_mmap)
    src.set(SAVE)                                 # -> 010: stop-and-copy
    src.d.model.tick(5)                           # stopped: changes nothing
    stream += src.save_loop(use_mmap)
    assert src.rd(8, 8) == 0
    src.set(0)                                    # -> 000
    assert dst.d.model != src.d.model
    dst.set(RESUME)
    dst.resume_loop(bytes(stream), 5000, use_mmap)
    dst.set(RUN)                                  # 100 -> 001 validates and loads
    assert dst.d.model == src.d.model


def test_pending_read_has_no_side_effect_without_a_buffer(pair: tuple[Region, Region]) -> None:
    src, _ = pair
    src.set(SAVE)
    first = src.rd(8, 8)
    assert first == src.rd(8, 8) > 0
    src.rd(16, 8)                                  # commit a buffer
    size = src.rd(24, 8)
    assert src.rd(16, 8) == src.rd(16, 8)          # data_offset re-read: same buffer
    assert src.rd(8, 8) == first - size            # pending read acknowledges it


def test_bad_stream_fails_leaving_resuming_and_enters_error(pair: tuple[Region, Region]) -> None:
    src, dst = pair
    src.set(SAVE)
    stream = src.save_loop()
    dst.set(RESUME)
    dst.resume_loop(stream[:len(stream) // 2], 4096)
    before = dst.d.model.digest()
    assert err(dst.set, RUN) == errno.EINVAL
    assert dst.state & v1.V1_STATE_MASK == v1.V1_STATE_ERROR
    assert dst.d.model.digest() == before
    assert err(dst.set, 0) == errno.EINVAL          # ERROR: every write refused
    dst.d.reset()
    assert dst.state == V1_RESERVED | RUN


def test_foreign_stream_is_rejected_at_once(rig: RigFactory) -> None:
    s = specs()
    other = dataclasses.replace(s["v1"], name="0000:98:00.0", device=0x1234)
    r = rig(s["v1"], other)
    src, dst = Region(r[s["v1"].name]), Region(r[other.name])
    src.set(SAVE)
    stream = src.save_loop()
    dst.set(RESUME)
    assert err(dst.resume_loop, stream, 4096) == errno.EFAULT


@pytest.mark.parametrize("err_no,after", [(errno.EIO, v1.V1_STATE_ERROR), (errno.EBUSY, RUN)])
def test_injected_state_write_fault(pair: tuple[Region, Region], err_no: int, after: int) -> None:
    src, _ = pair
    src.d.rig.faults.inject("v1:SAVING|RUNNING", err_no)
    assert err(src.set, SAVE | RUN) == err_no
    assert src.state & v1.V1_STATE_MASK == after
    src.d.reset()
    src.set(SAVE | RUN)                             # the fault was one-shot
    assert src.state & v1.V1_STATE_MASK == SAVE | RUN


def test_injected_data_fault_and_unsupported_transitions(pair: tuple[Region, Region]) -> None:
    src, dst = pair
    src.set(SAVE)
    assert err(src.set, SAVE | RUN) == errno.EINVAL          # 010 -> 011 refused
    assert err(src.set, RESUME) == errno.EINVAL              # saving -> resuming refused
    src.d.rig.faults.inject("v1:read_data", errno.EIO)
    assert err(src.rd, 16, 8) == errno.EIO
    stream = src.save_loop()                                 # a retry loses nothing
    dst.set(RESUME)
    dst.resume_loop(stream, 8192)
    dst.set(0)
    assert dst.d.model == src.d.model


def test_mmap_outside_the_sparse_area_and_window_bounds(pair: tuple[Region, Region]) -> None:
    src, _ = pair
    k, fd = src.d.kernel, src.d.fd
    assert err(k.mmap, fd, 4096, src.offset) == errno.EINVAL          # register page
    start, size = src.areas[0]
    assert err(k.mmap, fd, size + 4096, src.offset + start) == errno.EINVAL
    assert err(k.pread, fd, 16, src.offset + src.size - 8) == errno.EINVAL
    assert err(k.pwrite, fd, b"x", src.offset + start) == errno.EINVAL   # not RESUMING
