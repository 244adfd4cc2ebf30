"""vfiod.vfio.bitmap: buffer checks and the unaligned OR used to reassemble split dirty
queries, against a bit-by-bit reference."""

from __future__ import annotations

import numpy as np
import pytest

from vfiod.vfio import bitmap as bm


def _bits(words: np.ndarray, n: int) -> list[int]:
    return [int(words[i // 64] >> np.uint64(i % 64)) & 1 for i in range(n)]


@pytest.mark.parametrize("offset", [0, 1, 63, 64, 65, 130])
@pytest.mark.parametrize("nbits", [1, 5, 64, 65, 200])
def test_or_at_matches_bitwise_reference(offset: int, nbits: int) -> None:
    rng = np.random.default_rng(offset * 1000 + nbits)
    total = offset + nbits + 70
    dst = rng.integers(0, 2**63, size=bm.words_for(total), dtype=np.uint64)
    src = rng.integers(0, 2**63, size=bm.words_for(nbits) + 1, dtype=np.uint64)
    expect = _bits(dst, total)
    src_bits = _bits(src, nbits)
    for i, b in enumerate(src_bits):
        expect[offset + i] |= b
    bm.or_at(dst, src, nbits, offset)
    assert _bits(dst, total) == expect


def test_prepare_zeroes_and_checks_out() -> None:
    out = np.full(4, 7, dtype=np.uint64)
    got = bm.prepare(out, 130, "op")
    assert got is out and not out[:3].any() and out[3] == 7    # only the words needed
    with pytest.raises(ValueError, match="3 needed for 130 pages"):
        bm.prepare(np.zeros(2, dtype=np.uint64), 130, "op")
    with pytest.raises(TypeError, match="uint64"):
        bm.prepare(np.zeros(4, dtype=np.int64), 10, "op")
    with pytest.raises(ValueError, match="C-contiguous"):
        bm.prepare(np.zeros(8, dtype=np.uint64)[::2], 10, "op")


def test_sizes() -> None:
    assert bm.pages(4096 * 3 + 1, 4096) == 4
    assert bm.words_for(64) == 1 and bm.words_for(65) == 2 and bm.words_for(0) == 0
