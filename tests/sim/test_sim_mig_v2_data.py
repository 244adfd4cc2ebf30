"""v2 data fds, PRECOPY_INFO, MIG_DATA_SIZE, save/restore and fault injection on the
simulated kernel (docs/kernel-contract.md §6.3, §6.7 - §6.9, §9.1, §11)."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

import vfiod.abi.vfio as v
from tests.support.sim_mig_rig import (
    GET,
    SET,
    Dev,
    RigFactory,
    S,
    make_rigs,
    migrate,
    specs,
    twin,
)
from vfiod.errors import KernelError
from vfiod.kernel.sim.migration.stream import HEADER

PRECOPY_SETS = ["v2_precopy", "v2_precopy_p2p"]
ALL_V2 = ["v2_stop_copy", "v2_p2p", "v2_precopy", "v2_precopy_p2p"]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[RigFactory]:
    yield from make_rigs(tmp_path)


def one(rig: RigFactory, name: str = "v2_precopy_p2p", **extra: object) -> Dev:
    spec = specs()[name]
    if extra:
        spec = dataclasses.replace(spec, extra={**spec.extra, **extra})
    return rig(spec)[spec.name]


def errno_of(fn, *args) -> int:
    with pytest.raises(KernelError) as e:
        fn(*args)
    return e.value.errno


# -- PRE_COPY reads: temporary end, initial/dirty bytes -------------------------------------
@pytest.mark.parametrize("name", PRECOPY_SETS)
def test_precopy_temporary_end_is_enomsg_by_default(rig: RigFactory, name: str) -> None:
    d = one(rig, name)
    fd = d.set_state(S.PRE_COPY)
    info = d.precopy_info(fd)
    assert info.initial_bytes == d.spec.precopy_size and info.dirty_bytes == 0
    got = d.drain(fd)                          # stops at ENOMSG
    assert len(got) == d.spec.precopy_size
    assert errno_of(d.kernel.read, fd, 100) == errno.ENOMSG
    info = d.precopy_info(fd)
    assert (info.initial_bytes, info.dirty_bytes) == (0, 0)
    d.model.tick(1)                            # the running device re-dirties its state
    assert d.precopy_info(fd).dirty_bytes > 0
    assert d.kernel.read(fd, 10)               # more pre-copy data appeared


def test_precopy_temporary_end_can_be_a_zero_read(rig: RigFactory) -> None:
    d = one(rig, precopy_empty="zero")         # mtty / qat style
    fd = d.set_state(S.PRE_COPY)
    d.drain(fd)
    assert d.kernel.read(fd, 100) == b""
    d.model.tick(1)
    assert d.kernel.read(fd, 100) != b""       # 0 was not the end of the stream


def test_initial_bytes_shrink_as_read_and_never_mix_with_dirty(rig: RigFactory) -> None:
    d = one(rig)
    fd = d.set_state(S.PRE_COPY)
    d.model.tick(2)
    size = d.spec.precopy_size
    first = d.kernel.read(fd, 1000)
    assert d.precopy_info(fd).initial_bytes == size - 1000
    rest = d.kernel.read(fd, 10 * size)        # must stop at the end of the initial data
    assert len(first) + len(rest) == size
    info = d.precopy_info(fd)
    assert info.initial_bytes == 0 and info.dirty_bytes > 0
    assert len(d.drain(fd)) == info.dirty_bytes


def test_precopy_info_rules(rig: RigFactory) -> None:
    d = one(rig)
    fd = d.set_state(S.PRE_COPY)
    assert d.precopy_info(fd, flags=0x5A).flags == 0x5A         # flags echoed back
    short = v.vfio_precopy_info(argsz=16)
    assert errno_of(d.kernel.ioctl, fd, v.VFIO_MIG_GET_PRECOPY_INFO, short) == errno.EINVAL
    assert errno_of(d.kernel.ioctl, fd, v.VFIO_MIG_GET_PRECOPY_INFO, bytearray(8)) \
        == errno.EFAULT                                           # buffer < 24 bytes
    assert errno_of(d.kernel.ioctl, fd, v.VFIO_DEVICE_GET_INFO, bytearray(24)) == errno.ENOTTY
    d.set_state(S.PRE_COPY_P2P)
    assert d.precopy_info(fd).argsz == ctypes.sizeof(v.vfio_precopy_info)
    d.set_state(S.STOP_COPY)                   # same fd, but no longer a PRE_COPY state
    assert errno_of(d.precopy_info, fd) == errno.EINVAL


def test_precopy_info_on_resuming_fd_is_enotty(rig: RigFactory) -> None:
    d = one(rig)
    rfd = d.set_state(S.RESUMING)
    assert errno_of(d.precopy_info, rfd) == errno.ENOTTY


# -- STOP_COPY, EOF, session end, stream-file rules -----------------------------------------
def test_stop_copy_reads_to_eof_and_keeps_the_precopy_fd(rig: RigFactory) -> None:
    d = one(rig)
    fd = d.set_state(S.PRE_COPY)
    d.drain(fd)
    assert d.set_state(S.STOP_COPY) == -1
    tail = d.drain(fd)
    assert tail
    assert d.kernel.read(fd, 100) == b"" and d.kernel.read(fd, 100) == b""   # EOF stays


@pytest.mark.parametrize("how", ["leave_state", "reset", "close_device"])
def test_reads_after_session_end_are_enodev(rig: RigFactory, how: str) -> None:
    d = one(rig)
    fd = d.set_state(S.PRE_COPY)
    if how == "leave_state":
        d.set_state(S.RUNNING)
    elif how == "reset":
        d.reset()
    else:
        d.kernel.close(d.fd)
        d.raw.device = d.fd = d.kernel.ioctl(
            d.raw.group, v.VFIO_GROUP_GET_DEVICE_FD,
            ctypes.create_string_buffer(d.spec.name.encode()))
        assert d.get_state() == S.RUNNING
    assert errno_of(d.kernel.read, fd, 10) == errno.ENODEV
    d.kernel.close(fd)


def test_stream_file_rules(rig: RigFactory) -> None:
    d = one(rig)
    fd = d.set_state(S.PRE_COPY)
    assert errno_of(d.kernel.pread, fd, 10, 0) == errno.ESPIPE
    assert errno_of(d.kernel.pwrite, fd, b"x", 0) == errno.ESPIPE
    assert errno_of(d.kernel.write, fd, b"x") == errno.EBADF
    assert errno_of(d.kernel.read, fd, -1) == errno.EINVAL
    d.set_state(S.RUNNING)
    rfd = d.set_state(S.RESUMING)
    assert errno_of(d.kernel.read, rfd, 10) == errno.EBADF
    assert errno_of(d.kernel.pwrite, rfd, b"x", 0) == errno.ESPIPE


# -- MIG_DATA_SIZE -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_V2)
def test_mig_data_size_predicts_stop_copy_exactly(rig: RigFactory, name: str) -> None:
    d = one(rig, name)
    before = d.data_size()
    for state in (S.STOP, S.RESUMING):           # queryable in any state
        d.set_state(state)
        assert d.data_size() == before
    d.reset()                                    # (an empty stream cannot leave RESUMING)
    d.set_state(S.STOP)
    fd = d.set_state(S.STOP_COPY)
    assert len(d.drain(fd)) == before


def test_mig_data_size_during_precopy(rig: RigFactory) -> None:
    d = one(rig)
    fd = d.set_state(S.PRE_COPY)
    d.drain(fd)
    d.model.tick(2)
    predicted = d.data_size()
    d.set_state(S.STOP_COPY)
    assert len(d.drain(fd)) == predicted


def test_mig_features_payload_and_direction_checks(rig: RigFactory) -> None:
    d = one(rig)
    for fid in (v.VFIO_DEVICE_FEATURE_MIGRATION, v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE):
        assert errno_of(d.feature, fid, GET, 4) == errno.EINVAL        # short payload
        assert errno_of(d.feature, fid, SET, 8) == errno.EINVAL        # GET only
        d.feature(fid, v.VFIO_DEVICE_FEATURE_PROBE | GET)
    assert errno_of(d.feature, v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, GET, 4) == errno.EINVAL
    assert errno_of(d.feature, v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, SET, 7) == errno.EINVAL
    assert d.get_state() == S.RUNNING


# -- save on one device, restore on another --------------------------------------------------
@pytest.mark.parametrize("name,precopy", [(n, False) for n in ALL_V2]
                         + [(n, True) for n in PRECOPY_SETS])
def test_save_restore_digests_equal(rig: RigFactory, name: str, precopy: bool) -> None:
    spec = specs()[name]
    r = rig(spec, twin(spec))
    src, dst = r[spec.name], r["0000:99:00.0"]
    src.model.tick(5)
    assert src.model != dst.model
    migrate(src, dst, precopy=precopy)
    assert dst.model == src.model and dst.model.digest() == src.model.digest()
    assert dst.set_state(S.RUNNING) == -1
    # Both continue identically from the migrated state (ticks depend on seed and count).
    src.set_state(S.RUNNING)
    src.model.tick(3)
    dst.model.tick(3)
    assert dst.model == src.model


def test_stream_of_another_device_kind_is_rejected(rig: RigFactory) -> None:
    s = specs()
    a, b = s["v2_precopy_p2p"], s["v2_p2p"]              # different vendor/device
    r = rig(a, b)
    src, dst = r[a.name], r[b.name]
    fd = src.set_state(S.STOP_COPY)
    stream = src.drain(fd)
    rfd = dst.set_state(S.RESUMING)
    assert errno_of(dst.kernel.write, rfd, stream) == errno.EFAULT     # header, mtty style
    assert errno_of(dst.set_state, S.STOP) == errno.EINVAL
    assert dst.get_state() == S.RESUMING
    dst.reset()
    assert dst.get_state() == S.RUNNING
    assert errno_of(dst.kernel.write, rfd, b"x") == errno.ENODEV


@pytest.mark.parametrize("damage", ["short", "no_end", "flipped", "truncated_header"])
def test_bad_streams_fail_resuming_to_stop(rig: RigFactory, damage: str) -> None:
    spec = specs()["v2_p2p"]
    r = rig(spec, twin(spec))
    src, dst = r[spec.name], r["0000:99:00.0"]
    fd = src.set_state(S.STOP_COPY)
    stream = bytearray(src.drain(fd))
    before = dst.model.digest()
    if damage == "short":
        stream = stream[:len(stream) // 2]
    elif damage == "no_end":
        stream = stream[:-60]
    elif damage == "flipped":
        stream[HEADER.size + 100] ^= 0xFF          # inside the first STATE chunk's data
    else:
        stream = stream[:10]
    rfd = dst.set_state(S.RESUMING)
    dst.kernel.write(rfd, bytes(stream))
    assert errno_of(dst.set_state, S.RUNNING) == errno.EINVAL
    assert dst.get_state() == S.RESUMING            # stays; nothing was applied
    assert dst.model.digest() == before
    assert errno_of(dst.set_state, S.STOP) == errno.EINVAL     # again: still refused


def test_bytes_after_end_are_enomem(rig: RigFactory) -> None:
    spec = specs()["v2_stop_copy"]
    r = rig(spec, twin(spec))
    src, dst = r[spec.name], r["0000:99:00.0"]
    stream = src.drain(src.set_state(S.STOP_COPY))
    rfd = dst.set_state(S.RESUMING)
    # Any write segmentation is fine (§6.7)...
    for i in range(0, len(stream), 777):
        dst.kernel.write(rfd, stream[i:i + 777])
    # ...but not one byte more than the stream.
    assert errno_of(dst.kernel.write, rfd, b"\0") == errno.ENOMEM
    dst.set_state(S.STOP)
    assert dst.model == src.model


# -- fault injection ---------------------------------------------------------------------
def test_injected_eio_on_an_arc_leaves_error(rig: RigFactory) -> None:
    d = one(rig)
    d.rig.faults.inject("transition:RUNNING_P2P->STOP", errno.EIO)
    buf, err = d.set_state_raw(S.STOP_COPY)
    assert err is not None and err.errno == errno.EIO
    assert d.get_state() == S.ERROR
    assert errno_of(d.set_state, S.RUNNING) == errno.EINVAL       # only reset helps
    d.reset()
    assert d.get_state() == S.RUNNING


def test_injected_other_errno_leaves_last_reached_state(rig: RigFactory) -> None:
    d = one(rig)
    # RUNNING -> STOP_COPY = RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY; fail the last arc.
    d.rig.faults.inject(f"transition:STOP->STOP_COPY@{d.spec.name}", errno.EAGAIN)
    _, err = d.set_state_raw(S.STOP_COPY)
    assert err is not None and err.errno == errno.EAGAIN
    assert d.get_state() == S.STOP
    assert d.set_state(S.STOP_COPY) >= 0                          # the fault was one-shot


def test_fault_on_another_device_does_not_fire(rig: RigFactory) -> None:
    d = one(rig)
    d.rig.faults.inject("transition:RUNNING->RUNNING_P2P@0000:00:00.0", errno.EIO)
    d.set_state(S.STOP)
    assert d.get_state() == S.STOP


def test_injected_data_read_fault_loses_nothing(rig: RigFactory) -> None:
    spec = specs()["v2_precopy"]
    r = rig(spec, twin(spec))
    src, dst = r[spec.name], r["0000:99:00.0"]
    fd = src.set_state(S.STOP_COPY)
    r.faults.inject("read:data_fd", errno.EIO, skip=2)
    stream = bytearray(src.kernel.read(fd, 500) + src.kernel.read(fd, 500))
    assert errno_of(src.kernel.read, fd, 500) == errno.EIO
    stream += src.drain(fd)                     # retry continues where it stopped
    rfd = dst.set_state(S.RESUMING)
    r.faults.inject("write:data_fd", errno.EINTR)
    assert errno_of(dst.kernel.write, rfd, bytes(stream)) == errno.EINTR
    dst.kernel.write(rfd, bytes(stream))
    dst.set_state(S.STOP)
    assert dst.model == src.model
