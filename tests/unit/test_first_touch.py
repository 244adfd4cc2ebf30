"""A page the destination's memory never held costs a fault to land, and the prediction
counts it (vfiod/migration/session/first_touch.py; docs/architecture.md §4;
docs/kernel-contract.md §3.7 on which memory is resident)."""

from __future__ import annotations

import errno
import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from vfiod.errors import KernelError, ProtocolError
from vfiod.kernel.linux import LinuxKernel
from vfiod.kernel.sim.kernel import SimKernel
from vfiod.migration.guest.memory import RamBlock
from vfiod.migration.session import digest
from vfiod.migration.session.digest import RamDigests
from vfiod.migration.session.first_touch import (
    FIRST_TOUCH_MAX_S,
    fault_s,
    first_touch_from_hello,
    first_touch_landing_s,
    measure_first_touch_s,
    not_resident_share,
)
from vfiod.migration.session.phases import PredictionNumbers
from vfiod.migration.stream.ram_framing import BATCH_PIECES
from vfiod.vfio import RamRegion

PS = 4096


@pytest.fixture
def block() -> Iterator[RamBlock]:
    b = RamBlock.open(LinuxKernel(), RamRegion("ram", 0, 64 * PS), label="first-touch-test")
    try:
        yield b
    finally:
        b.close()


def _resident(kernel: LinuxKernel, b: RamBlock) -> bytes:
    return kernel.mincore(b.addr, b.region.size)


def test_mincore_tells_resident_pages_and_refuses_what_the_kernel_refuses(
        block: RamBlock) -> None:
    k = LinuxKernel()
    assert not any(v & 1 for v in _resident(k, block))       # a fresh memfd: all holes
    view = np.frombuffer(block.mem, dtype=np.uint8)
    view[3 * PS] = 1
    _ = view[5 * PS]                # a read allocates a memfd's page too
    del view
    assert [i for i, v in enumerate(_resident(k, block)) if v & 1] == [3, 5]
    with pytest.raises(KernelError) as e:
        k.mincore(block.addr + 1, PS)                          # not page-aligned
    assert e.value.errno == errno.EINVAL
    # the simulated kernel's memory is real: it answers the same, errors included
    sim = SimKernel(k)
    assert sim.mincore(block.addr, block.region.size) == _resident(k, block)
    with pytest.raises(KernelError) as e:
        sim.mincore(block.addr + 1, PS)
    assert e.value.errno == errno.EINVAL


def test_the_residency_sample_reads_no_page(block: RamBlock) -> None:
    k = LinuxKernel()
    assert not_resident_share(k, [block], PS, samples=16) == 1.0
    assert not any(v & 1 for v in _resident(k, block))        # nothing faulted in
    view = np.frombuffer(block.mem, dtype=np.uint8)
    view[::2 * PS] = 1                                         # every other page
    del view
    # 16 samples, one in the middle of each 4 pages: pages 2, 6, 10, ..., all written;
    # 32, one in each 2 pages: pages 1, 3, 5, ..., none written; 64: every page
    assert not_resident_share(k, [block], PS, samples=16) == 0.0
    assert not_resident_share(k, [block], PS, samples=32) == 1.0
    assert not_resident_share(k, [block], PS, samples=64) == 0.5


def test_the_sample_spreads_over_every_block(block: RamBlock) -> None:
    k = LinuxKernel()
    other = RamBlock.open(k, RamRegion("high", 1 << 30, 64 * PS), label="first-touch-test")
    try:
        np.frombuffer(block.mem, dtype=np.uint8)[::PS] = 1     # the first all resident
        assert not_resident_share(k, [block, other], PS, samples=16) == 0.5
        assert not_resident_share(k, [other, block], PS, samples=16) == 0.5
        assert not_resident_share(k, [], PS) == 0.0
    finally:
        other.close()


def test_memory_that_is_all_resident_costs_nothing_more(block: RamBlock) -> None:
    k = LinuxKernel()
    np.frombuffer(block.mem, dtype=np.uint8)[::PS] = 1
    assert measure_first_touch_s(k, [block], PS) == 0.0


def _writes(took: list[float]) -> Callable[[], float]:
    """A clock read before and after each write: each write takes the next of ``took``."""
    ticks = itertools.accumulate(x for t in took for x in (1.0, t))
    return lambda: next(ticks)


def test_the_fault_price_is_the_first_rounds_mean_write_less_the_seconds() -> None:
    # one write held up 5 ms by the scheduler is left out; a slow fault (30 µs) counts
    first, again = [10e-6] * 6 + [30e-6, 5e-3], [1e-6] * 8
    assert fault_s(LinuxKernel(), pages=8, stride=2 * PS, clock=_writes(first + again)) == \
        pytest.approx((6 * 10e-6 + 30e-6) / 7 - 1e-6)
    # noise the other way round is no negative price
    assert fault_s(LinuxKernel(), pages=8, stride=2 * PS,
                   clock=_writes([1e-6] * 8 + [2e-6] * 8)) == 0.0


def test_the_source_counts_the_runs_pages_it_never_sent() -> None:
    regions = (RamRegion("lo", 0, 8 * PS), RamRegion("hi", 16 * PS, 8 * PS))
    mems = [bytearray(8 * PS), bytearray(8 * PS)]
    d = RamDigests(regions, mems, PS)
    firsts, counts = np.array([2, 16]), np.array([4, 8])       # 4 pages of lo, all of hi
    assert d.never_landed(firsts, counts) == 12
    # pages sent (their CRCs from the stream) or re-hashed with data are no longer counted
    mems[0][3 * PS] = 7
    d.touch_range(3, 1)
    d.rehash()
    sent = np.array([1, 2], dtype=np.uint32)       # any CRCs but a zero page's
    d.take_page_crcs(17, sent)
    assert d.never_landed(firsts, counts) == 12 - 1 - 2
    assert d.never_landed(np.array([8]), np.array([8])) == 0   # between the regions
    assert d.never_landed(np.array([], dtype=np.int64), np.array([], dtype=np.int64)) == 0


@pytest.mark.parametrize("value", ["0.001", True, -1e-6, FIRST_TOUCH_MAX_S * 2, math.nan,
                                   math.inf, [1e-6]])
def test_a_hello_with_a_bad_price_is_refused_naming_it(value: object) -> None:
    with pytest.raises(ProtocolError, match="first_touch_s"):
        first_touch_from_hello({"first_touch_s": value})


def test_a_hello_without_a_price_is_an_older_destinations() -> None:
    assert first_touch_from_hello({}) == 0.0
    assert first_touch_from_hello({"first_touch_s": 0}) == 0.0
    assert first_touch_from_hello({"first_touch_s": 5e-6}) == 5e-6


def _numbers(pages: int, runs: int) -> PredictionNumbers:
    return PredictionNumbers(dirty_ram_bytes=pages * PS, dirty_runs=runs,
                             dirty_records=runs, measured_dirty_bytes=pages * PS,
                             device_stopcopy_bytes=0, device_precopy_bytes=0, tracking=True,
                             first_touch_pages=pages)


def test_what_the_landing_adds_is_its_tail_or_what_outlasts_the_pass() -> None:
    price, record = 5e-6, 4 << 20

    def shows(num: PredictionNumbers, bps: float) -> float:
        return first_touch_landing_s(num, price, bps, record, PS)
    # a pass of one short record: it lands after it arrived, all of it shows
    assert shows(_numbers(50, 50), 1e6) == pytest.approx(50 * price)
    # 300 scattered pages: a record of 236 and a tail of 64 (TAIL_PAGES); what lands
    # after the first record arrived shows, less the tail's time on the wire...
    assert shows(_numbers(300, 300), 1e9) == pytest.approx(300 * price - 64 * PS / 1e9)
    # ... and on a slow link the tail's time covers all of that: the tail's own shows
    assert shows(_numbers(300, 300), 1e6) == pytest.approx(300 * price * 64 / 300)
    # 65536 pages in runs of 16: a first record of 1024 pages (a record's bytes), the
    # rest of the pass on the wire while it lands
    big = _numbers(65536, 4096)
    assert shows(big, 1e9) == pytest.approx(65536 * price - (65536 - 1024) * PS / 1e9)
    assert shows(big, 1e8) == pytest.approx(65536 * price * 64 / 65536)
    # scattered single pages: the first record is a send batch's pieces (BATCH_PIECES)
    assert shows(_numbers(2000, 2000), 1e9) == pytest.approx(
        2000 * price - (2000 - BATCH_PIECES) * PS / 1e9)
    assert first_touch_landing_s(big, 0.0, 1e9, record, PS) == 0.0


def test_the_scratch_file_is_closed_and_unmapped_after_the_fault_price() -> None:
    class Counting(LinuxKernel):
        def __init__(self) -> None:
            self.opened: list[int] = []
            self.closed: list[int] = []

        def memfd_create(self, name: str, size: int) -> int:
            fd = super().memfd_create(name, size)
            self.opened.append(fd)
            return fd

        def close(self, fd: int) -> None:
            self.closed.append(fd)
            super().close(fd)

    k = Counting()
    ticks = itertools.count()
    fault_s(k, pages=4, clock=lambda: float(next(ticks)))
    assert k.opened == k.closed and len(k.opened) == 1
    with open("/proc/self/maps") as maps:
        assert "vfiod-first-touch" not in maps.read()      # unmapped too


def test_the_sources_warm_up_loads_the_count_its_predictions_use() -> None:
    # a prediction must not compile: the warm-up's types are the ones never_landed passes
    digest.warm_up()
    loaded = list(digest._count_in_runs.signatures)
    d = RamDigests((RamRegion("ram", 0, 8 * PS),), [bytearray(8 * PS)], PS)
    assert d.never_landed(np.array([0, 4], dtype=np.uint64), np.array([2, 2])) == 4
    assert list(digest._count_in_runs.signatures) == loaded
