"""Device DMA logging on the simulated kernel (docs/kernel-contract.md §6.1, §7): START/STOP/REPORT
argument checks with the kernel's errno values, report bit layout and read-and-clear, and
the device's DMA writes (through its IOMMU mapping) landing in the log."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import vfiod.abi.vfio as v
from tests.support.sim_mig_rig import GET, PROBE, SET, Dev, RigFactory, make_rigs, specs
from vfiod.errors import KernelError
from vfiod.kernel.sim.migration.dma_logging import DmaLogging
from vfiod.kernel.sim.rawvfio import map_dma

START, STOP, REPORT = (v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
                       v.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
                       v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT)
VADDR = 0x7F00_0000_0000          # the simulator never touches mapped memory without data
IOVA = 1 << 30
MAPPED = 16 << 20


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[RigFactory]:
    yield from make_rigs(tmp_path)


def dev(rig: RigFactory, name: str = "v2_precopy_p2p_log", **extra: object) -> Dev:
    spec = specs()[name]
    if extra:
        spec = dataclasses.replace(spec, extra={**spec.extra, **extra})
    d = rig(spec)[spec.name]
    map_dma(d.kernel, d.raw.container, IOVA, MAPPED, VADDR)
    return d


def ranges_array(ranges: list[tuple[int, int]]) -> ctypes.Array:
    arr = (v.vfio_device_feature_dma_logging_range * max(1, len(ranges)))()
    for i, (iova, length) in enumerate(ranges):
        arr[i].iova, arr[i].length = iova, length
    return arr


def start(d: Dev, ranges: list[tuple[int, int]], page_size: int = 4096,
          num: int | None = None, ptr: int | None = None) -> int:
    arr = ranges_array(ranges)
    control = v.vfio_device_feature_dma_logging_control(
        page_size=page_size, num_ranges=len(ranges) if num is None else num,
        ranges=ctypes.addressof(arr) if ptr is None else ptr)
    buf = d.feature(START, SET, bytes(control))
    return int(v.vfio_device_feature_dma_logging_control.from_buffer_copy(buf, 8).page_size)


def report(d: Dev, iova: int, length: int, page_size: int = 4096,
           bitmap: np.ndarray | None = None, ptr: int | None = None) -> np.ndarray:
    if bitmap is None:
        bitmap = np.zeros(max(1, -(-(length // page_size) // 64)), dtype=np.uint64)
    rep = v.vfio_device_feature_dma_logging_report(
        iova=iova, length=length, page_size=page_size,
        bitmap=bitmap.ctypes.data if ptr is None else ptr)
    d.feature(REPORT, GET, bytes(rep))
    return bitmap


def bits(bitmap: np.ndarray) -> list[int]:
    return [i for i in range(bitmap.size * 64) if int(bitmap[i // 64]) >> (i % 64) & 1]


def err(fn, *args, **kw) -> int:
    with pytest.raises(KernelError) as e:
        fn(*args, **kw)
    return e.value.errno


def test_probe_and_absence(rig: RigFactory) -> None:
    d = dev(rig)
    d.feature(START, PROBE | SET)
    assert err(d.feature, START, PROBE | GET) == errno.EINVAL
    assert err(d.feature, REPORT, SET, 32) == errno.EINVAL
    plain = rig(specs()["v2_precopy_p2p"])[specs()["v2_precopy_p2p"].name]
    for fid in (START, STOP, REPORT):
        assert err(plain.feature, fid, PROBE | SET) == errno.ENOTTY


@pytest.mark.parametrize("case,expect", [
    ("zero_ranges", errno.EINVAL), ("too_many", errno.E2BIG), ("misaligned_iova", errno.EINVAL),
    ("misaligned_len", errno.EINVAL), ("overlap", errno.EINVAL), ("overflow", errno.EOVERFLOW),
    ("page_size_not_pow2", errno.EINVAL), ("page_size_small", errno.EINVAL),
    ("null_ranges", errno.EFAULT), ("zero_length", errno.EINVAL), ("short_payload", errno.EINVAL),
])
def test_start_checks(rig: RigFactory, case: str, expect: int) -> None:
    d = dev(rig)
    r = [(IOVA, 1 << 20)]
    kw: dict[str, object] = {}
    if case == "zero_ranges":
        kw["num"] = 0
    elif case == "too_many":
        r = [(IOVA + i * 4096, 4096) for i in range(257)]
    elif case == "misaligned_iova":
        r = [(IOVA + 512, 4096)]
    elif case == "misaligned_len":
        r = [(IOVA, 4097)]
    elif case == "overlap":
        r = [(IOVA, 8192), (IOVA + 4096, 8192)]
    elif case == "overflow":
        r = [((1 << 64) - 4096, 8192)]
    elif case == "page_size_not_pow2":
        kw["page_size"] = 3 * 4096
        r = [(0, 3 * 4096)]
    elif case == "page_size_small":
        kw["page_size"] = 2048
    elif case == "null_ranges":
        kw["ptr"] = 0
    elif case == "zero_length":
        r = [(IOVA, 0)]
    if case == "short_payload":
        assert err(d.feature, START, SET, 16) == expect
    else:
        assert err(start, d, r, **kw) == expect
    # nothing was started: a good START still works
    assert start(d, [(IOVA, 1 << 20)]) == 4096


def test_kernel_order_e2big_before_range_checks(rig: RigFactory) -> None:
    d = dev(rig)
    bad = [(IOVA + 1, 1)] * 300                   # misaligned AND too many: E2BIG first
    assert err(start, d, bad) == errno.E2BIG


def test_one_session_at_a_time_and_stop(rig: RigFactory) -> None:
    d = dev(rig)
    d.feature(STOP, SET)                          # STOP without a session: no-op success
    assert start(d, [(IOVA, 1 << 20)], page_size=8192) == 8192
    assert err(start, d, [(IOVA, 1 << 20)]) == errno.EINVAL
    d.feature(STOP, SET)
    assert err(report, d, IOVA, 1 << 20) == errno.EINVAL     # no session any more
    start(d, [(IOVA, 1 << 20)])


def test_driver_range_cap(rig: RigFactory) -> None:
    d = dev(rig, dma_logging_max_ranges=4)
    assert err(start, d, [(IOVA + i * 8192, 4096) for i in range(5)]) == errno.E2BIG
    start(d, [(IOVA + i * 8192, 4096) for i in range(4)])


def test_report_is_relative_read_and_clear_and_ors(rig: RigFactory) -> None:
    d = dev(rig)
    start(d, [(IOVA, 4 << 20)])
    d.node.dma_write(IOVA + 5 * 4096 + 100, 10)             # page 5
    d.node.dma_write(IOVA + 70 * 4096 - 1, 2)                # pages 69 and 70
    d.node.dma_write(IOVA + (8 << 20), 4096)                 # outside the tracked range
    base = IOVA + 4 * 4096                                   # report from page 4 on
    pre = np.zeros(2, dtype=np.uint64)
    pre[1] = np.uint64(1 << 63)                              # a bit the caller had set
    got = report(d, base, 100 * 4096, bitmap=pre)
    assert bits(got) == [1, 65, 66, 127]                     # relative to ``base``; ORed
    assert bits(report(d, base, 100 * 4096)) == []           # read-and-clear


def test_report_merges_to_a_larger_page_size_and_keeps_partial_granules(rig: RigFactory) -> None:
    d = dev(rig)
    start(d, [(IOVA, 4 << 20)])
    for page in (0, 1, 17):
        d.node.dma_write(IOVA + page * 4096, 1)
    assert bits(report(d, IOVA, 1 << 20, page_size=64 << 10)) == [0, 1]
    # A report covering only part of a dirty granule leaves the granule dirty.
    d.node.dma_write(IOVA + 2 * 4096, 1)
    assert bits(report(d, IOVA + 2 * 4096 + 0, 4096)) == [0]
    assert bits(report(d, IOVA, 1 << 20)) == []


def test_report_checks(rig: RigFactory) -> None:
    d = dev(rig)
    start(d, [(IOVA, 1 << 20)])
    assert err(report, d, IOVA, 1 << 20, page_size=2048) == errno.EINVAL
    assert err(report, d, IOVA, 1 << 20, page_size=12288) == errno.EINVAL
    assert err(report, d, (1 << 64) - 4096, 8192) == errno.EOVERFLOW
    assert err(report, d, IOVA, 1 << 20, ptr=0) == errno.EFAULT
    assert err(d.feature, REPORT, GET, 24) == errno.EINVAL


def test_report_errno_of_a_kernel_without_iova_bitmap(rig: RigFactory) -> None:
    d = dev(rig, dma_logging_report_errno=errno.EOPNOTSUPP)     # Debian 6.12 guest
    start(d, [(IOVA, 1 << 20)])
    d.feature(STOP, SET)
    start(d, [(IOVA, 1 << 20)])
    assert err(report, d, IOVA, 1 << 20) == errno.EOPNOTSUPP
    assert err(report, d, IOVA, 1 << 20, page_size=100) == errno.EINVAL   # checked first


def test_session_survives_reset_but_not_close(rig: RigFactory) -> None:
    d = dev(rig)
    start(d, [(IOVA, 1 << 20)])
    d.reset()
    d.node.dma_write(IOVA, 1)
    assert bits(report(d, IOVA, 1 << 20)) == [0]
    (log,) = [p for p in d.parts.closables if isinstance(p, DmaLogging)]
    d.kernel.close(d.fd)                         # last close of the device fd
    assert not log.active
    d.raw.device = d.fd = d.kernel.ioctl(d.raw.group, v.VFIO_GROUP_GET_DEVICE_FD,
                                         ctypes.create_string_buffer(d.spec.name.encode()))
    assert err(report, d, IOVA, 1 << 20) == errno.EINVAL       # no session after reopen
    start(d, [(IOVA, 1 << 20)])


def test_v1_device_can_log_too(rig: RigFactory) -> None:
    d = dev(rig, "v1_log")
    start(d, [(IOVA, 1 << 20)])
    d.node.dma_write(IOVA + 3 * 4096, 4096 * 2)
    assert bits(report(d, IOVA, 1 << 20)) == [3, 4]
