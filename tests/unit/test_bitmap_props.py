"""Every numba kernel equals its numpy reference (bitmap_ref), on random bitmaps.

Offsets and lengths are drawn with the edge cases weighted in (0, 1, 63, 64, 65, the whole
bitmap, next to the end); words are drawn from 0, all-ones, single bits, low/high masks
and random values, so the kernels' skip paths and partial words are all exercised. Every
written array sits between guard words, so a write outside it fails the test.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiod.dirty import bitmap_kernels as K
from vfiod.dirty import bitmap_ref as R
from vfiod.dirty import bitmap_rescale

ALL = (1 << 64) - 1
PROPS = settings(max_examples=150, deadline=None)

words_st = st.one_of(
    st.just(0), st.just(ALL), st.integers(0, ALL),
    st.integers(0, 63).map(lambda b: 1 << b),               # one bit
    st.integers(1, 63).map(lambda b: (1 << b) - 1),         # low run
    st.integers(1, 63).map(lambda b: ALL ^ ((1 << b) - 1)),  # high run
)


def bitmaps(min_words: int = 1, max_words: int = 40) -> st.SearchStrategy[np.ndarray]:
    return st.lists(words_st, min_size=min_words, max_size=max_words).map(
        lambda ws: np.array(ws, dtype=np.uint64))


def edgy(draw: st.DrawFn, lo: int, hi: int) -> int:
    """An int in [lo, hi], often one of the edge cases."""
    specials = [v for v in (lo, hi, lo + 1, hi - 1, 63, 64, 65, 0, 1) if lo <= v <= hi]
    return draw(st.one_of(st.sampled_from(specials), st.integers(lo, hi)))


GUARD = np.array([0xDEADBEEF_0BADF00D, 0x5A5A5A5A_A5A5A5A5], dtype=np.uint64)


def guarded(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(buffer, view): ``view`` is a copy of ``words`` with guard words on both sides."""
    buf = np.concatenate([GUARD, words, GUARD])
    return buf, buf[2:-2]


def assert_guards(buf: np.ndarray) -> None:
    assert np.array_equal(buf[:2], GUARD) and np.array_equal(buf[-2:], GUARD), "out-of-bounds write"


@st.composite
def merge_case(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, int]:
    src = draw(bitmaps())
    nbits = edgy(draw, 0, src.shape[0] * 64)
    extra = draw(st.integers(0, 3))
    dst = draw(bitmaps(min_words=max(1, (nbits + 63) // 64 + extra),
                       max_words=max(1, (nbits + 63) // 64 + extra)))
    off = edgy(draw, 0, dst.shape[0] * 64 - nbits)
    return dst, src, off, nbits


@PROPS
@given(merge_case())
def test_or_merge_matches_reference(case: tuple[np.ndarray, np.ndarray, int, int]) -> None:
    dst, src, off, nbits = case
    want = dst.copy()
    want_count = R.or_merge(want, src, off, nbits)
    buf, got = guarded(dst)
    src_before = src.copy()
    assert K.or_merge(got, src, off, nbits) == want_count == R.popcount(src, nbits)
    assert np.array_equal(got, want)
    assert np.array_equal(src, src_before)
    assert_guards(buf)


@st.composite
def range_case(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    words = draw(bitmaps())
    total = words.shape[0] * 64
    first = edgy(draw, 0, total)
    nbits = edgy(draw, 0, total - first)
    return words, first, nbits


@PROPS
@given(range_case())
def test_test_and_clear_matches_reference(case: tuple[np.ndarray, int, int]) -> None:
    words, first, nbits = case
    want_words = words.copy()
    want = R.test_and_clear(want_words, first, nbits)
    buf, got_words = guarded(words)
    got = K.test_and_clear(got_words, first, nbits)
    assert got.dtype == np.uint64 and got.shape == want.shape == ((nbits + 63) // 64,)
    assert np.array_equal(got, want)
    assert np.array_equal(got_words, want_words)
    assert_guards(buf)


@PROPS
@given(range_case())
def test_set_range_matches_reference(case: tuple[np.ndarray, int, int]) -> None:
    words, first, nbits = case
    want = words.copy()
    R.set_range(want, first, nbits)
    buf, got = guarded(words)
    K.set_range(got, first, nbits)
    assert np.array_equal(got, want)
    assert_guards(buf)


@st.composite
def count_case(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    words = draw(bitmaps())
    return words, edgy(draw, 0, words.shape[0] * 64)


@PROPS
@given(count_case())
def test_popcount_matches_reference(case: tuple[np.ndarray, int]) -> None:
    words, nbits = case
    assert K.popcount(words, nbits) == R.popcount(words, nbits)
    assert K.popcount(words) == R.popcount(words)


@PROPS
@given(count_case(), st.one_of(st.sampled_from([1, 2, 63, 64, 65]), st.integers(1, 5000)))
def test_dirty_runs_matches_reference(case: tuple[np.ndarray, int], max_run: int) -> None:
    words, nbits = case
    f_want, c_want = R.dirty_runs(words, nbits, max_run)
    f_got, c_got = K.dirty_runs(words, nbits, max_run)
    assert f_got.dtype == c_got.dtype == np.int64
    assert np.array_equal(f_got, f_want) and np.array_equal(c_got, c_want)


PGSIZES = [512, 4096, 8192, 65536, 1 << 18, 1 << 21]


@PROPS
@given(count_case(), st.sampled_from(PGSIZES), st.sampled_from(PGSIZES))
def test_rescale_matches_reference(case: tuple[np.ndarray, int], sp: int, dp: int) -> None:
    src, nbits = case
    want = R.rescale(src, sp, dp, nbits)
    got = K.rescale(src, sp, dp, nbits)
    assert got.dtype == np.uint64 and got.shape == want.shape
    assert np.array_equal(got, want)


# --- larger bitmaps: the vectorised loop bodies and their remainders -----------------------

def _sparse(rng: np.random.Generator, nw: int) -> np.ndarray:
    words = np.zeros(nw, dtype=np.uint64)
    hit = rng.choice(nw, nw // 10, replace=False)
    words[hit] = rng.integers(0, 1 << 64, hit.shape[0], dtype=np.uint64, endpoint=False)
    words[rng.choice(nw, nw // 10, replace=False)] = np.uint64(ALL)
    return words


@pytest.mark.parametrize("off", [0, 1, 63, 64, 65, 64 * 77 + 31])
def test_large_merge_and_extract(off: int) -> None:
    rng = np.random.default_rng(off)
    src = _sparse(rng, 3001)
    nbits = 3001 * 64 - 17
    dst = _sparse(rng, 3100)
    want = dst.copy()
    assert K.or_merge(dst, src, off, nbits) == R.or_merge(want, src, off, nbits) \
        == R.popcount(src, nbits)
    assert np.array_equal(dst, want)
    assert np.array_equal(K.test_and_clear(dst, off, nbits), R.test_and_clear(want, off, nbits))
    assert np.array_equal(dst, want)


@pytest.mark.parametrize("max_run", [1, 64, 1000, 1 << 40])
def test_large_runs_and_popcount(max_run: int) -> None:
    words = _sparse(np.random.default_rng(max_run), 5003)
    nbits = 5003 * 64 - 5
    for a, b in zip(K.dirty_runs(words, nbits, max_run), R.dirty_runs(words, nbits, max_run),
                    strict=True):
        assert np.array_equal(a, b)
    assert K.popcount(words, nbits) == R.popcount(words, nbits)


def test_kernels_are_nogil_and_cached() -> None:
    # docs/architecture.md §3: kernels release the GIL and are cached (the daemon's start-up cost)
    kernels: list[Any] = [K._k_or_merge, K._k_popcount, K._k_runs, K._k_extract, K._k_fill,
                          K._k_split_runs, bitmap_rescale._k_coarsen, bitmap_rescale._k_refine]
    for fn in kernels:
        assert fn.targetoptions.get("nogil") is True, fn
        assert type(fn._cache).__name__ == "FunctionCache", fn  # NullCache without cache=True


@pytest.mark.parametrize("nbits", [64 * 1000, 64 * 1000 - 1, 64 * 999 + 1])
def test_dense_runs_outgrow_the_first_guess(nbits: int) -> None:
    # 32 runs per word: the kernel runs out of room several times and is resumed
    words = np.full(1000, 0x5555_5555_5555_5555, dtype=np.uint64)
    words[::7] = np.uint64(ALL)
    for max_run in (1, 3, 1 << 20):
        for a, b in zip(K.dirty_runs(words, nbits, max_run), R.dirty_runs(words, nbits, max_run),
                        strict=True):
            assert np.array_equal(a, b)
