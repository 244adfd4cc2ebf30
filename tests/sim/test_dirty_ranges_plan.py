"""DMA-logging range planning (docs/kernel-contract.md §7) and the opt-out rule (docs/architecture.md §3):
pure parts of the dirty providers, checked without a kernel."""

from __future__ import annotations

import pytest

from vfiod.abi.vfio import MigState
from vfiod.dirty.optout import OptOut, state_lookup
from vfiod.dirty.providers.device_logging import MAX_RANGES, plan_ranges

P = 4096


def test_touching_ranges_are_joined_and_sorted() -> None:
    got = plan_ranges([(3 * P, P), (0, P), (P, 2 * P)], P)
    assert got == [(0, 4 * P)]


def test_far_apart_ranges_stay_separate() -> None:
    assert plan_ranges([(0, P), (10 * P, P)], P) == [(0, P), (10 * P, P)]


def test_more_than_256_ranges_merge_smallest_gaps_first() -> None:
    # 300 one-page ranges: gap of 1 page everywhere except every 10th gap of 100 pages
    ranges, addr = [], 0
    for i in range(300):
        ranges.append((addr, P))
        addr += P + (100 * P if i % 10 == 9 else P)
    got = plan_ranges(ranges, P)
    assert len(got) <= MAX_RANGES
    # every original range is covered by exactly one planned range
    for a, n in ranges:
        assert sum(1 for s, m in got if s <= a and a + n <= s + m) == 1
    # the big gaps are the last to close: all 29 survive when 256 ranges are allowed
    big_gaps = [(ranges[i][0] + P, ranges[i + 1][0]) for i in range(299) if i % 10 == 9]
    for lo, hi in big_gaps:
        assert not any(s < hi and lo < s + m for s, m in got), (lo, hi)


def test_merge_to_a_lower_limit() -> None:
    ranges = [(i * 2 * P, P) for i in range(10)]
    got = plan_ranges(ranges, P, max_ranges=3)
    assert len(got) == 3
    assert got[0][0] == 0 and got[-1][0] + got[-1][1] == 19 * P


@pytest.mark.parametrize("ranges, msg", [
    ([], "at least one range"),
    ([(0, 0)], "length > 0"),
    ([(P // 2, P)], "not aligned"),
    ([(0, P + 1)], "not aligned"),
    ([(0, 2 * P), (P, 2 * P)], "overlaps"),
    ([((1 << 64) - P, 2 * P)], "EOVERFLOW"),
])
def test_bad_ranges_are_refused_before_any_ioctl(ranges: list[tuple[int, int]],
                                                 msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        plan_ranges(ranges, P)


def test_bad_page_size_refused() -> None:
    with pytest.raises(ValueError, match="power of two >= 4096"):
        plan_ranges([(0, P)], 3000)
    with pytest.raises(ValueError, match="power of two >= 4096"):
        plan_ranges([(0, P)], 2048)


def test_optout_blocks_only_in_running_and_pre_copy() -> None:
    oo = OptOut.from_config(["a", "b", "c"], {"a": False, "b": True})
    assert oo.devices == ("a",)
    for st in MigState:
        blocked = oo.blocking(state_lookup({"a": st}))
        assert bool(blocked) == (st in (MigState.RUNNING, MigState.PRE_COPY)), st


def test_optout_unknown_state_counts_as_running() -> None:
    oo = OptOut(("dev",))
    assert oo.blocking(state_lookup(None)) == ["dev (state unknown)"]
    assert oo.blocking(state_lookup(lambda n: 99)) == ["dev (state unknown)"]
    assert oo.blocking(state_lookup(lambda n: MigState.STOP_COPY)) == []
