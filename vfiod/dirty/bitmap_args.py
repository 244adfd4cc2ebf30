"""Argument checks and geometry shared by the bitmap reference and the numba kernels.

The bitmap layout is the kernel's dirty-bitmap layout (docs/kernel-contract.md §3.9 and §4.4):
little-endian u64 words, bit ``i`` (page ``i``) is bit ``i % 64`` of word ``i // 64``.
Here a bitmap is a 1-D C-contiguous ``numpy.uint64`` array; the word *values* carry that
layout, so the host byte order does not matter once the words are loaded.

Both ``bitmap_ref`` (the specification) and ``bitmap_kernels`` (the fast versions) validate
each operation's arguments with the one ``*_args`` function here, so they accept and refuse
exactly the same inputs. Every refusal is a
``ValueError`` whose message names the function, the argument and what was wrong; the
kernels rely on these checks to never index outside an array (numba does not bounds-check).
"""

from __future__ import annotations

import operator

import numpy as np
import numpy.typing as npt

from vfiod.vfio.bitmap import Bitmap

WORD_BITS = 64
U64 = np.dtype(np.uint64)

Pages = npt.NDArray[np.int64]  # page numbers or page counts


def check_words(fn: str, name: str, arr: object, *, writable: bool = False) -> Bitmap:
    """Return ``arr`` if it is a usable bitmap, else raise ``ValueError`` saying why."""
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{fn}: {name} must be a numpy uint64 array, got {type(arr).__name__}")
    if arr.dtype != U64 or arr.ndim != 1 or not arr.flags.c_contiguous:
        raise ValueError(f"{fn}: {name} must be a 1-D C-contiguous uint64 array, got dtype "
                         f"{arr.dtype} ndim {arr.ndim} contiguous={arr.flags.c_contiguous}")
    if writable and not arr.flags.writeable:
        raise ValueError(f"{fn}: {name} is read-only but is written to")
    return arr


def check_count(fn: str, name: str, value: object, *, minimum: int = 0) -> int:
    """Return ``value`` as an int >= ``minimum`` (bools and floats are refused)."""
    if isinstance(value, bool | float):
        raise ValueError(f"{fn}: {name} must be an integer, got {value!r}")
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{fn}: {name} must be an integer, got {type(value).__name__}") from None
    if n < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {n}")
    return n


def check_span(fn: str, name: str, arr: Bitmap, first_bit: int, nbits: int) -> None:
    """Refuse a bit range ``[first_bit, first_bit + nbits)`` that does not fit in ``arr``."""
    have = arr.shape[0] * WORD_BITS
    if first_bit + nbits > have:
        raise ValueError(f"{fn}: bits [{first_bit}, {first_bit + nbits}) do not fit in {name} "
                         f"({arr.shape[0]} words = {have} bits)")


def check_disjoint(fn: str, a_name: str, a: Bitmap, b_name: str, b: Bitmap) -> None:
    """Refuse overlapping buffers: the word-shifting kernels read words they already wrote."""
    if np.may_share_memory(a, b):
        raise ValueError(f"{fn}: {a_name} and {b_name} share memory; pass a copy")


def check_page_size(fn: str, name: str, value: object) -> int:
    """A page size is a positive power of two (every IOMMU and CPU page size is)."""
    n = check_count(fn, name, value, minimum=1)
    if n & (n - 1):
        raise ValueError(f"{fn}: {name} must be a power of two, got {n}")
    return n


def rescaled_nbits(nbits: int, src_pgsize: int, dst_pgsize: int) -> int:
    """How many ``dst_pgsize`` pages cover ``nbits`` pages of ``src_pgsize`` (from page 0)."""
    if dst_pgsize >= src_pgsize:
        ratio = dst_pgsize // src_pgsize
        return (nbits + ratio - 1) // ratio
    return nbits * (src_pgsize // dst_pgsize)


def tail_mask(nbits: int) -> int:
    """Mask of the valid bits in the last word of an ``nbits`` bitmap (all ones if full)."""
    tail = nbits % WORD_BITS
    return (1 << tail) - 1 if tail else (1 << WORD_BITS) - 1


# -- the arguments of each bitmap operation, checked once for both implementations ------------

def or_merge_args(dst: object, src: object, dst_bit_offset: object,
                  nbits: object) -> tuple[Bitmap, Bitmap, int, int]:
    """``or_merge``: a writable ``dst``, a ``src`` not sharing its memory, both spans fit."""
    fn = "or_merge"
    d = check_words(fn, "dst", dst, writable=True)
    s = check_words(fn, "src", src)
    off = check_count(fn, "dst_bit_offset", dst_bit_offset)
    n = check_count(fn, "nbits", nbits)
    check_span(fn, "src", s, 0, n)
    check_span(fn, "dst", d, off, n)
    check_disjoint(fn, "dst", d, "src", s)
    return d, s, off, n


def popcount_args(words: object, nbits: object | None) -> tuple[Bitmap, int]:
    """``popcount``: the words and how many bits to count (all of them for ``None``)."""
    fn = "popcount"
    w = check_words(fn, "words", words)
    n = w.shape[0] * WORD_BITS if nbits is None else check_count(fn, "nbits", nbits)
    check_span(fn, "words", w, 0, n)
    return w, n


def dirty_runs_args(words: object, nbits: object, max_run: object) -> tuple[Bitmap, int, int]:
    """``dirty_runs``: the words, the bit count that fits them, a ``max_run`` of at least 1."""
    fn = "dirty_runs"
    w = check_words(fn, "words", words)
    n = check_count(fn, "nbits", nbits)
    longest = check_count(fn, "max_run", max_run, minimum=1)
    check_span(fn, "words", w, 0, n)
    return w, n, longest


def bit_range_args(fn: str, words: object, first_bit: object,
                   nbits: object) -> tuple[Bitmap, int, int]:
    """``test_and_clear`` and ``set_range``: writable words and a bit range inside them."""
    w = check_words(fn, "words", words, writable=True)
    first = check_count(fn, "first_bit", first_bit)
    n = check_count(fn, "nbits", nbits)
    check_span(fn, "words", w, first, n)
    return w, first, n


def rescale_args(src: object, src_pgsize: object, dst_pgsize: object,
                 nbits: object) -> tuple[Bitmap, int, int, int]:
    """``rescale``: the source words, both page sizes (powers of two), the bits to take."""
    fn = "rescale"
    s = check_words(fn, "src", src)
    sp = check_page_size(fn, "src_pgsize", src_pgsize)
    dp = check_page_size(fn, "dst_pgsize", dst_pgsize)
    n = check_count(fn, "nbits", nbits)
    check_span(fn, "src", s, 0, n)
    return s, sp, dp, n
