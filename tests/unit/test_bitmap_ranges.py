"""Range tables and page/byte arithmetic (vfiod/dirty/ranges.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiod.dirty.ranges import (
    PageRange,
    bytes_to_pages,
    merge_ranges,
    pages_to_bytes,
    split_ranges,
    total_pages,
)

tables = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), max_size=30)


def covered(first: np.ndarray, count: np.ndarray) -> set[int]:
    return {p for f, c in zip(first.tolist(), count.tolist(), strict=True)
            for p in range(f, f + c)}


@settings(max_examples=150, deadline=None)
@given(tables)
def test_merge_ranges_covers_the_same_pages_with_disjoint_sorted_ranges(
        rows: list[tuple[int, int]]) -> None:
    f = np.array([r[0] for r in rows], dtype=np.int64)
    c = np.array([r[1] for r in rows], dtype=np.int64)
    mf, mc = merge_ranges(f, c)
    assert covered(mf, mc) == covered(f, c)
    assert (mc > 0).all()
    # sorted, and a gap of at least one page between neighbours (touching ones are joined)
    assert (mf[1:] > mf[:-1] + mc[:-1]).all()


def test_merge_ranges_examples() -> None:
    f, c = merge_ranges([10, 0, 5, 20, 30], [5, 5, 3, 0, 1])
    assert f.tolist() == [0, 10, 30] and c.tolist() == [8, 5, 1]
    f, c = merge_ranges([0, 2], [10, 3])  # one inside the other
    assert f.tolist() == [0] and c.tolist() == [10]
    f, c = merge_ranges([], [])
    assert f.shape == c.shape == (0,) and f.dtype == np.int64


@settings(max_examples=150, deadline=None)
@given(tables, st.integers(1, 50))
def test_split_ranges_keeps_pages_and_order(rows: list[tuple[int, int]], mx: int) -> None:
    f = np.array([r[0] for r in rows], dtype=np.int64)
    c = np.array([r[1] for r in rows], dtype=np.int64)
    sf, sc = split_ranges(f, c, mx)
    assert ((sc >= 1) & (sc <= mx)).all()
    assert total_pages(sc) == total_pages(c)
    want = [(s, min(mx, a + n - s)) for a, n in rows for s in range(a, a + n, mx)]
    assert list(zip(sf.tolist(), sc.tolist(), strict=True)) == want


def test_table_errors() -> None:
    with pytest.raises(ValueError, match="merge_ranges: first and count must be 1-D arrays of "
                                         r"one length, got shapes \(2,\) and \(1,\)"):
        merge_ranges([1, 2], [1])
    with pytest.raises(ValueError, match="split_ranges: first and count must be integer arrays"):
        split_ranges([1.5], [2], 4)
    with pytest.raises(ValueError, match="negative page number or count"):
        merge_ranges([1], [-2])
    with pytest.raises(ValueError, match="split_ranges: max_pages must be >= 1, got 0"):
        split_ranges([1], [2], 0)


def test_pages_and_bytes() -> None:
    assert pages_to_bytes(3, 4096) == 12288
    assert bytes_to_pages(12288, 4096) == 3
    assert bytes_to_pages(12289, 4096, round_up=True) == 4
    assert bytes_to_pages(0, 2 << 20) == 0
    with pytest.raises(ValueError, match="12289 bytes is not a whole number of 4096-byte pages"):
        bytes_to_pages(12289, 4096)
    with pytest.raises(ValueError, match="pages_to_bytes: page_size must be a power of two"):
        pages_to_bytes(1, 4000)
    with pytest.raises(ValueError, match="bytes_to_pages: nbytes must be >= 0"):
        bytes_to_pages(-1, 4096)


def test_page_range() -> None:
    r = PageRange(5, 10)
    assert r.end == 15
    with pytest.raises(ValueError, match="PageRange: first must be an integer"):
        PageRange(1.5, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="PageRange: first must be >= 0"):
        PageRange(-1, 2)
