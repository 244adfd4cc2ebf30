"""The numpy reference (the specification) against a model anyone can check by eye:
the bitmap as one Python integer, page i = bit i, built bit by bit from the words.

Also pins the layout of docs/kernel-contract.md §3.9 with hand-made examples."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiod.dirty import bitmap_ref as R

ALL = (1 << 64) - 1
MODEL = settings(max_examples=100, deadline=None)
word_lists = st.lists(st.one_of(st.just(0), st.just(ALL), st.integers(0, ALL)), min_size=1,
                      max_size=12)


def to_int(words: np.ndarray) -> int:
    return sum(int(w) << (64 * k) for k, w in enumerate(words))


def to_words(value: int, n: int) -> np.ndarray:
    return np.array([(value >> (64 * k)) & ALL for k in range(n)], dtype=np.uint64)


def mask(first: int, nbits: int) -> int:
    return ((1 << nbits) - 1) << first


def model_runs(value: int, nbits: int, max_run: int) -> list[tuple[int, int]]:
    out, page = [], 0
    while page < nbits:
        if not (value >> page) & 1:
            page += 1
            continue
        start = page
        while page < nbits and (value >> page) & 1:
            page += 1
        for s in range(start, page, max_run):
            out.append((s, min(max_run, page - s)))
    return out


def test_layout_matches_the_kernel() -> None:
    # bit i%64 of little-endian u64 word i//64 covers page i
    w = np.zeros(2, dtype=np.uint64)
    R.set_range(w, 0, 1)
    R.set_range(w, 64, 1)
    R.set_range(w, 127, 1)
    assert [int(x) for x in w] == [1, 1 | (1 << 63)]
    assert w.astype("<u8").tobytes()[:1] == b"\x01" and w.astype("<u8").tobytes()[15] == 0x80
    first, count = R.dirty_runs(np.array([0b0111_0001, 1 << 63], np.uint64), 128, 2)
    assert first.tolist() == [0, 4, 6, 127] and count.tolist() == [1, 2, 1, 1]


@MODEL
@given(word_lists, word_lists, st.data())
def test_or_merge_model(src_l: list[int], dst_l: list[int], data: st.DataObject) -> None:
    src, dst = np.array(src_l, np.uint64), np.array(dst_l + src_l, np.uint64)
    nbits = data.draw(st.integers(0, len(src_l) * 64))
    off = data.draw(st.integers(0, len(dst) * 64 - nbits))
    want = to_int(dst) | ((to_int(src) & mask(0, nbits)) << off)
    merged = R.or_merge(dst, src, off, nbits)
    assert to_int(dst) == want
    assert merged == bin(to_int(src) & mask(0, nbits)).count("1")   # the set bits merged


@MODEL
@given(word_lists, st.data())
def test_popcount_and_runs_model(words_l: list[int], data: st.DataObject) -> None:
    words = np.array(words_l, np.uint64)
    nbits = data.draw(st.integers(0, len(words_l) * 64))
    max_run = data.draw(st.integers(1, 200))
    value = to_int(words) & mask(0, nbits)
    assert R.popcount(words, nbits) == bin(value).count("1")
    first, count = R.dirty_runs(words, nbits, max_run)
    assert list(zip(first.tolist(), count.tolist(), strict=True)) == model_runs(value, nbits,
                                                                                 max_run)


@MODEL
@given(word_lists, st.data())
def test_test_and_clear_and_set_range_model(words_l: list[int], data: st.DataObject) -> None:
    words = np.array(words_l, np.uint64)
    total = len(words_l) * 64
    first = data.draw(st.integers(0, total))
    nbits = data.draw(st.integers(0, total - first))
    value = to_int(words)
    marked = words.copy()
    R.set_range(marked, first, nbits)
    assert to_int(marked) == value | mask(first, nbits)
    taken = R.test_and_clear(words, first, nbits)
    assert taken.shape == ((nbits + 63) // 64,)
    assert to_int(taken) == (value >> first) & mask(0, nbits)
    assert to_int(words) == value & ~mask(first, nbits)


@MODEL
@given(word_lists, st.data(), st.integers(0, 7), st.integers(0, 7))
def test_rescale_model(words_l: list[int], data: st.DataObject, ls: int, ld: int) -> None:
    src = np.array(words_l, np.uint64)
    nbits = data.draw(st.integers(0, len(words_l) * 64))
    value = to_int(src) & mask(0, nbits)
    sp, dp = 4096 << ls, 4096 << ld
    got = R.rescale(src, sp, dp, nbits)
    if dp >= sp:
        r = dp // sp
        n_out = -(-nbits // r)
        want = sum(1 << j for j in range(n_out) if value & mask(j * r, r))
    else:
        r = sp // dp
        n_out = nbits * r
        want = sum(mask(i * r, r) for i in range(nbits) if (value >> i) & 1)
    assert got.shape == ((n_out + 63) // 64,)
    assert to_int(got) == want
