"""``report_in_place`` (``vfiod/dirty/report_in_place.py``): a report written over the
guest bitmap's own words (type1 GET_BITMAP semantics, docs/kernel-contract.md §3.9) ends
as the OR-merge a scratch buffer gives, bit for bit, whatever the words held; it declines
(without calling the report) when what they hold is too much to save; a failing report
loses none of the bits that were there."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vfiod.dirty.report_in_place import SAVE_FRACTION, report_in_place

M64 = (1 << 64) - 1


def popcount(words: np.ndarray) -> int:
    return sum(bin(int(w)).count("1") for w in words)


def overwrite(report: np.ndarray, nbits: int):  # noqa: ANN201
    """The kernel's write of one mapping at a word boundary: every word it touches takes
    the report's bits, the last word's bits past ``nbits`` become 0."""
    def write(words: np.ndarray) -> None:
        n = (nbits + 63) // 64
        words[:n] = report[:n]
        if nbits % 64:
            words[n - 1] &= np.uint64((1 << (nbits % 64)) - 1)
    return write


def old_words(rng: random.Random, n: int, kind: str) -> np.ndarray:
    if kind == "clean":
        return np.zeros(n, np.uint64)
    if kind == "sparse":            # a few words with bits, as another container leaves
        w = np.zeros(n, np.uint64)
        for i in rng.sample(range(n), min(n, 3)):
            w[i] = rng.getrandbits(64)
        return w
    if kind == "full-with-holes":   # everything dirty but a few words
        w = np.full(n, M64, np.uint64)
        for i in rng.sample(range(n), min(n, 3)):
            w[i] = rng.getrandbits(64)
        return w
    return np.array([rng.getrandbits(64) for _ in range(n)], np.uint64)   # "mixed"


@pytest.mark.parametrize("kind", ["clean", "sparse", "full-with-holes"])
@pytest.mark.parametrize("seed", range(12))
def test_the_result_is_the_or_merge(kind: str, seed: int) -> None:
    rng = random.Random(seed)
    # past SAVE_MIN_WORDS words, so that an all-ones range is saved by its holes
    total = rng.randrange(4, 40) if seed % 2 else rng.randrange(100, 300)
    first_word = rng.randrange(0, total - 2)
    nbits = rng.randrange(1, (total - first_word) * 64 + 1)
    words = old_words(rng, total, kind)
    before = words.copy()
    report = np.array([rng.getrandbits(64) if rng.random() < 0.5 else 0
                       for _ in range((nbits + 63) // 64)], np.uint64)
    bits = [(i, b) for i in range(nbits) for b in [int(report[i // 64]) >> (i % 64) & 1] if b]
    want = before.copy()
    for i, _ in bits:
        p = first_word * 64 + i
        want[p // 64] |= np.uint64(1 << (p % 64))
    got = report_in_place(words, first_word * 64, nbits, overwrite(report, nbits))
    assert got is not None and got.reported == len(bits)
    assert words.tolist() == want.tolist()
    assert got.added == popcount(want) - popcount(before)


def test_a_mixed_range_is_declined_untouched() -> None:
    rng = random.Random(3)
    words = old_words(rng, 4 * SAVE_FRACTION * 64, "mixed")
    before = words.copy()
    called = []
    assert report_in_place(words, 64, 3 * SAVE_FRACTION * 64 * 64,
                           lambda w: called.append(1)) is None
    assert not called
    assert np.array_equal(words, before)


def test_a_failing_report_loses_no_bit() -> None:
    rng = random.Random(4)
    words = old_words(rng, 256, "sparse")
    words[200] = np.uint64(M64)
    before = words.copy()

    def half_then_fail(w: np.ndarray) -> None:
        w[:100] = 0                 # the kernel wrote part of it, then faulted
        raise OSError("EFAULT")
    with pytest.raises(OSError, match="EFAULT"):
        report_in_place(words, 0, 256 * 64, half_then_fail)
    assert np.array_equal(words & before, before)


def test_refuses_an_unaligned_or_oversized_range() -> None:
    words = np.zeros(4, np.uint64)
    with pytest.raises(ValueError, match="first_bit 3 is not a multiple of 64"):
        report_in_place(words, 3, 10, lambda w: None)
    with pytest.raises(ValueError, match=r"bits \[64, 320\) do not fit in words \(4 words\)"):
        report_in_place(words, 64, 256, lambda w: None)


def test_an_all_ones_range_saves_only_its_holes(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1000 words all ones but 3: the save is the 3 words, not the 1000
    import vfiod.dirty.report_in_place as rip
    saved = []
    real = rip._k_save
    monkeypatch.setattr(rip, "_k_save", lambda seg, fill, idx, val: (
        saved.append((int(fill), idx.size)), real(seg, fill, idx, val)))
    words = old_words(random.Random(9), 1000, "full-with-holes")
    report = np.zeros(1000, np.uint64)
    report_in_place(words, 0, 1000 * 64, overwrite(report, 1000 * 64))
    assert saved == [(M64, 3)]


@pytest.mark.parametrize("known", [0, M64])
def test_words_the_caller_knows_are_not_read(known: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import vfiod.dirty.report_in_place as rip
    monkeypatch.setattr(rip, "_k_unlike", lambda seg: pytest.fail("read"))
    words = np.full(8, np.uint64(known))
    report = np.array([1, 0, 0, 2], np.uint64)
    got = report_in_place(words, 64, 256, overwrite(report, 256), known=known)
    assert got is not None and got.reported == 2
    assert got.full == (known == M64)
    want = [known] * 8 if known else [0, 1, 0, 0, 2, 0, 0, 0]
    assert words.tolist() == want
    with pytest.raises(ValueError, match="known must be 0, all ones or None, got 0x5"):
        report_in_place(words, 64, 256, overwrite(report, 256), known=5)
