"""The simulator's dirty-bit store and its two bitmap writers, against plain-Python models
of what the kernels do (docs/kernel-contract.md §3.9 type1 ``update_user_bitmap``; §4.4 iommufd),
on random inputs."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vfiod.kernel.sim.dirtymap import _COPY_PIECE, DirtyMap, or_into_user, type1_copy_to_user

M64 = (1 << 64) - 1


def words_to_int(a: np.ndarray) -> int:
    return int.from_bytes(a.tobytes(), "little")


def int_to_words(x: int, n: int) -> np.ndarray:
    return np.frombuffer(x.to_bytes(8 * n, "little"), dtype=np.uint64).copy()


@pytest.mark.parametrize("seed", range(20))
def test_dirtymap_matches_a_set_of_pages(seed: int) -> None:
    rng = random.Random(seed)
    npages = rng.randrange(1, 700)
    dm, model = DirtyMap(npages), set()
    for _ in range(40):
        first, count = rng.randrange(-5, npages + 5), rng.randrange(0, 140)
        pages = {p for p in range(first, first + count) if 0 <= p < npages}
        if rng.random() < 0.7:
            dm.mark(first, count)
            model |= pages
        else:
            dm.clear(max(first, 0), count)
            model -= {p for p in range(max(first, 0), max(first, 0) + count)}
        assert sorted(dm.pages()) == sorted(model)
        assert dm.count() == len(model)
    lo, n = rng.randrange(npages), rng.randrange(1, npages + 1)
    assert sorted(dm.pages(lo, n)) == sorted(p for p in model if lo <= p < lo + n)


def test_dirtymap_allocates_nothing_until_marked() -> None:
    dm = DirtyMap(1 << 28)              # one TiB of 4 KiB pages
    assert dm.words is None and dm.count() == 0 and len(dm.pages()) == 0
    dm.mark(5, 1)
    assert dm.words is not None
    dm.clear()
    assert dm.words is None


@pytest.mark.parametrize("marks", [3, 5000])     # recorded words, and past the record
def test_dirtymap_keeps_its_array_across_clears(marks: int) -> None:
    # type1's per-mapping bitmap is kernel memory from START (or a mapping made while
    # tracking) to STOP or unmap (docs/kernel-contract.md §3.9); a query clears it in place
    dm = DirtyMap(1 << 16)
    assert dm.storage is None
    dm.allocate()
    kept = dm.storage
    assert kept is not None and not kept.any() and dm.words is None
    rng = np.random.default_rng(marks)
    for p in rng.choice(1 << 16, size=marks, replace=False):
        dm.mark(int(p), 1)
    assert dm.count() == marks
    dm.clear()
    assert dm.storage is kept and not kept.any()
    assert dm.words is None and dm.count() == 0
    dm.mark(70, 2)
    assert dm.storage is kept and sorted(dm.pages()) == [70, 71]
    dm.release()
    assert dm.storage is None and dm.words is None


def test_dirtymap_names_its_marked_words_until_too_many() -> None:
    dm = DirtyMap(64 * 4096)            # 4096 words: the record keeps 256
    dm.mark(5, 1)
    dm.mark(64 * 10 + 3, 64 * 2)        # words 10..12
    dm.mark(7, 1)                       # word 0 again
    marked = dm.marked_words()
    assert marked is not None and marked.tolist() == [0, 10, 11, 12]
    idx, got = dm.take_marked()         # read and clear
    assert idx.tolist() == [0, 10, 11, 12]
    assert got.tolist() == [(1 << 5) | (1 << 7), M64 << 3 & M64, M64, (1 << 3) - 1]
    assert dm.words is None and dm.storage is not None and not dm.storage.any()
    dm.mark(64 * 100, 64 * 300)         # 300 words: past the record
    assert dm.marked_words() is None
    with pytest.raises(ValueError, match="more words marked than the record keeps"):
        dm.take_marked()
    dm.clear()                          # the whole array is cleared then
    assert dm.storage is not None and not dm.storage.any()
    assert dm.marked_words() is not None and dm.marked_words().size == 0


def type1_model(user: int, bit_offset: int, nbits: int, src: set[int] | None) -> int:
    """update_user_bitmap: shift the mapping's bits to ``bit_offset``; OR the caller's
    first word back when that offset is not word aligned; overwrite every covered word."""
    shift, word = bit_offset % 64, bit_offset // 64
    nout = (nbits + shift + 63) // 64
    val = sum(1 << (shift + p) for p in (range(nbits) if src is None else src))
    if shift:
        val |= (user >> (64 * word)) & M64
    mask = ((1 << (64 * nout)) - 1) << (64 * word)
    return (user & ~mask) | (val << (64 * word))


@pytest.mark.parametrize("seed", range(40))
def test_type1_copy_matches_the_kernel_model(seed: int) -> None:
    rng = random.Random(seed)
    nbits = rng.randrange(1, 300)
    bit_offset = rng.randrange(0, 200)
    total = (bit_offset + nbits + 63) // 64 + 2
    user0 = rng.getrandbits(64 * total) if rng.random() < 0.5 else 0
    user = int_to_words(user0, total)
    all_dirty = rng.random() < 0.3
    src = None if all_dirty else {p for p in range(nbits) if rng.random() < 0.2}
    dm = DirtyMap(nbits)
    for p in src or ():
        dm.mark(p, 1)
    type1_copy_to_user(user.ctypes.data, bit_offset, nbits, dm, all_dirty, "test")
    assert words_to_int(user) == type1_model(user0, bit_offset, nbits, src)


@pytest.mark.parametrize("seed", range(30))
def test_type1_copy_after_marks_and_clears_matches_the_model(seed: int) -> None:
    # several queries of one map: marks, the answer (which clears), more marks, with few
    # marked words (a zeroing and the named words) and many (the whole array copied)
    rng = random.Random(seed)
    nbits = rng.randrange(1, 6000)
    bit_offset = rng.randrange(0, 130)
    total = (bit_offset + nbits + 63) // 64 + 1
    dm = DirtyMap(nbits)
    dm.allocate()
    for _ in range(4):
        density = rng.choice([0.0, 0.002, 0.05, 0.6])
        src = {p for p in range(nbits) if rng.random() < density}
        if rng.random() < 0.2 and nbits > 200:     # one long run besides
            a = rng.randrange(nbits - 200)
            src |= set(range(a, a + 150))
            dm.mark(a, 150)
        for p in sorted(src):
            dm.mark(p, 1)
        user0 = rng.getrandbits(64 * total)
        user = int_to_words(user0, total)
        type1_copy_to_user(user.ctypes.data, bit_offset, nbits, dm, False, "test")
        assert words_to_int(user) == type1_model(user0, bit_offset, nbits, src)
        assert dm.count() == 0 and not dm.storage.any()     # the GET's read-and-clear


def test_type1_shifted_copy_of_a_mapping_larger_than_one_copy_piece() -> None:
    # an unaligned mapping with too many marked words to name is shifted a piece at a
    # time: every piece boundary carries its top bits into the next word
    nbits = 2 * _COPY_PIECE + 4000       # bits: 16 pieces' worth of words, and some
    rng = np.random.default_rng(5)
    src = {int(p) for p in rng.choice(nbits, size=nbits // 8, replace=False)}
    src |= {63 + 64 * k for k in range(0, nbits // 64, 4096)}  # top bits at piece ends
    dm = DirtyMap(nbits)
    for p in src:
        dm.mark(p, 1)
    assert dm.marked_words() is None
    total = (37 + nbits + 63) // 64 + 1
    user0 = (1 << (64 * total)) - 1
    user = int_to_words(user0, total)
    type1_copy_to_user(user.ctypes.data, 37, nbits, dm, False, "test")
    assert words_to_int(user) == type1_model(user0, 37, nbits, src)


def iommufd_model(user: int, nbits_total: int, pages: set[int], first: int, npages: int,
                  bit_offset: int, scale: int) -> int:
    for p in pages:
        if first <= p < first + npages:
            b = (p - first + bit_offset) >> scale
            if b < nbits_total:
                user |= 1 << b
    return user


@pytest.mark.parametrize("seed", range(40))
def test_or_into_user_matches_the_model(seed: int) -> None:
    rng = random.Random(seed)
    npages = rng.randrange(1, 400)
    pages = {p for p in range(npages) if rng.random() < 0.15}
    dm = DirtyMap(npages)
    for p in pages:
        dm.mark(p, 1)
    first = rng.choice([0, 64 if npages > 64 else 0, rng.randrange(npages)])
    count = rng.randrange(1, npages - first + 1)
    scale = rng.choice([0, 0, 1, 3])
    bit_offset = rng.randrange(0, 100)
    nbits_total = ((bit_offset + count) >> scale) + 1
    nwords = (nbits_total + 63) // 64
    user0 = rng.getrandbits(64 * nwords) & ((1 << nbits_total) - 1)
    user = int_to_words(user0, nwords)
    or_into_user(user.ctypes.data, nbits_total, dm, first, count, bit_offset, scale, "test")
    assert words_to_int(user) == iommufd_model(user0, nbits_total, pages, first, count,
                                               bit_offset, scale)


def test_type1_copy_of_a_mapping_larger_than_one_copy_piece() -> None:
    # the word-aligned copy of a map with too many marked words to name goes in pieces
    # of _COPY_PIECE bytes (a cached copy, as the kernel's copy_to_user): every piece,
    # the last partial one too, lands in place
    nwords = 2 * _COPY_PIECE // 8 + 5
    nbits = nwords * 64 - 7
    rng = np.random.default_rng(3)
    dm = DirtyMap(nbits)
    for p in rng.choice(nbits, size=nwords // 8, replace=False):
        dm.mark(int(p), 1)
    assert dm.marked_words() is None and dm.storage is not None
    want = dm.storage.copy()
    user = np.full(nwords + 1, np.uint64(2**64 - 1))
    type1_copy_to_user(user.ctypes.data, 0, nbits, dm, False, "test")
    assert np.array_equal(user[:nwords], want)
    assert user[nwords] == np.uint64(2**64 - 1)            # past the mapping: untouched
    assert dm.words is None and not dm.storage.any()       # read and cleared
