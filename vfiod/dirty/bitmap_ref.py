"""Dirty-bitmap operations in plain numpy: the specification and the test oracle.

Layout (docs/kernel-contract.md §3.9, §4.4): little-endian u64 words, page ``i`` is bit ``i % 64`` of
word ``i // 64``. These functions are written to be obviously correct, not fast: each one
unpacks the words it touches into one byte per bit (``np.unpackbits(..., bitorder="little")``
over a little-endian byte view), does the operation on that bit array with ordinary
vectorised numpy (slicing, ``|``, ``np.diff``, ``reshape(...).any()``, ``np.repeat``) and
packs the result back. They are still vectorised (no Python loop per bit or per run), so
the benchmark ratios of ``bitmap_kernels`` against them are honest.

``bitmap_kernels`` must agree with every function here on every valid input, and both
refuse the same invalid inputs with ``ValueError`` (one check per operation in
``bitmap_args``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vfiod.dirty.bitmap_args import (
    WORD_BITS,
    Pages,
    bit_range_args,
    dirty_runs_args,
    or_merge_args,
    popcount_args,
    rescale_args,
    rescaled_nbits,
)
from vfiod.dirty.ranges import split_ranges
from vfiod.vfio.bitmap import Bitmap, words_for


def _unpack(words: Bitmap, nbits: int | None = None) -> npt.NDArray[np.uint8]:
    """One uint8 (0/1) per bit; ``astype('<u8')`` makes the byte view little-endian anywhere."""
    raw = words.astype("<u8", copy=False).view(np.uint8)
    return np.unpackbits(raw, count=nbits, bitorder="little")


def _pack(bits: npt.NDArray[np.uint8]) -> Bitmap:
    """Inverse of ``_unpack``: pad to whole words, pack, read back as native uint64."""
    padded = np.zeros(words_for(bits.shape[0]) * WORD_BITS, dtype=np.uint8)
    padded[: bits.shape[0]] = bits
    return np.packbits(padded, bitorder="little").view("<u8").astype(np.uint64)


def or_merge(dst: Bitmap, src: Bitmap, dst_bit_offset: int, nbits: int) -> int:
    """OR bits ``[0, nbits)`` of ``src`` into ``dst`` bits ``[dst_bit_offset, +nbits)``;
    returns how many of those ``src`` bits are set (the pages the bitmap reported).

    Bits of ``src`` at or beyond ``nbits`` are ignored; ``dst`` bits outside the range are
    untouched. Only the ``dst`` words the range touches are unpacked.
    """
    dst, src, off, nbits = or_merge_args(dst, src, dst_bit_offset, nbits)
    if nbits == 0:
        return 0
    lo, hi = off // WORD_BITS, words_for(off + nbits)
    seg = _unpack(dst[lo:hi])
    start = off - lo * WORD_BITS
    bits = _unpack(src, nbits)
    seg[start : start + nbits] |= bits
    dst[lo:hi] = _pack(seg)
    return int(bits.sum(dtype=np.int64))


def popcount(words: Bitmap, nbits: int | None = None) -> int:
    """Number of set bits among the first ``nbits`` bits (all of ``words`` if ``None``).

    Counts whole words with ``np.bitwise_count`` (numpy >= 2) and masks the partial last word;
    on older numpy it sums the unpacked bits instead.
    """
    words, n = popcount_args(words, nbits)
    if not hasattr(np, "bitwise_count"):
        return int(_unpack(words, n).sum(dtype=np.int64))
    full = n // WORD_BITS
    total = int(np.bitwise_count(words[:full]).sum(dtype=np.int64))
    tail = n % WORD_BITS
    if tail:
        total += bin(int(words[full]) & ((1 << tail) - 1)).count("1")
    return total


def dirty_runs(words: Bitmap, nbits: int, max_run: int) -> tuple[Pages, Pages]:
    """Maximal runs of set bits among the first ``nbits``, as ``(first_page, count)`` arrays.

    Runs are in ascending order; a run longer than ``max_run`` is split into pieces of
    ``max_run`` pages plus a shorter last piece. Runs come from the +1/-1 edges of the bit
    array (``np.diff`` with a 0 on either side); the split is ``ranges.split_ranges``.
    """
    words, nbits, max_run = dirty_runs_args(words, nbits, max_run)
    edges = np.diff(_unpack(words, nbits).view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1).astype(np.int64)
    lengths = np.flatnonzero(edges == -1).astype(np.int64) - starts
    return split_ranges(starts, lengths, max_run)


def test_and_clear(words: Bitmap, first_bit: int, nbits: int) -> Bitmap:
    """Return bits ``[first_bit, first_bit + nbits)`` as a new bitmap and clear them in ``words``.

    Bit ``j`` of the result is old bit ``first_bit + j``; the result has ``ceil(nbits/64)``
    words with bits beyond ``nbits`` zero.
    """
    words, first, nbits = bit_range_args("test_and_clear", words, first_bit, nbits)
    if nbits == 0:
        return np.zeros(0, dtype=np.uint64)
    lo, hi = first // WORD_BITS, words_for(first + nbits)
    seg = _unpack(words[lo:hi])
    start = first - lo * WORD_BITS
    out = _pack(seg[start : start + nbits].copy())
    seg[start : start + nbits] = 0
    words[lo:hi] = _pack(seg)
    return out


# pytest would otherwise collect this module-level name as a test when it is imported there
test_and_clear.__test__ = False  # type: ignore[attr-defined]


def set_range(words: Bitmap, first_bit: int, nbits: int) -> None:
    """Set bits ``[first_bit, first_bit + nbits)`` of ``words``; other bits untouched."""
    words, first, nbits = bit_range_args("set_range", words, first_bit, nbits)
    if nbits == 0:
        return
    lo, hi = first // WORD_BITS, words_for(first + nbits)
    seg = _unpack(words[lo:hi])
    start = first - lo * WORD_BITS
    seg[start : start + nbits] = 1
    words[lo:hi] = _pack(seg)


def rescale(src: Bitmap, src_pgsize: int, dst_pgsize: int, nbits: int) -> Bitmap:
    """Re-express the first ``nbits`` pages of ``src`` in ``dst_pgsize`` pages (from page 0).

    Coarser (``dst_pgsize > src_pgsize``, ratio ``r``): dst bit ``j`` is set iff any of src
    bits ``[j*r, (j+1)*r)`` below ``nbits`` is; the result has ``ceil(nbits/r)`` bits.
    Finer (ratio ``r = src/dst``): src bit ``i`` sets dst bits ``[i*r, (i+1)*r)``; the result
    has ``nbits*r`` bits. Equal sizes copy. Both sizes must be powers of two.
    The result is a new array of ``ceil(result_bits/64)`` words.
    """
    src, sp, dp, nbits = rescale_args(src, src_pgsize, dst_pgsize, nbits)
    bits = _unpack(src, nbits)
    if dp > sp:
        ratio = dp // sp
        padded = np.zeros(rescaled_nbits(nbits, sp, dp) * ratio, dtype=np.uint8)
        padded[:nbits] = bits
        return _pack(np.asarray(padded.reshape(-1, ratio).any(axis=1), dtype=np.uint8))
    return _pack(np.repeat(bits, sp // dp))
