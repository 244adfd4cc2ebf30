"""Word-level numba primitives shared by the bitmap kernels (docs/kernel-contract.md §3.9 layout).

Bitmaps are little-endian u64 words, page ``i`` = bit ``i % 64`` of word ``i // 64``. These
helpers work on one ``uint64`` word; they are compiled into (and inlined by LLVM in) the
kernels of ``bitmap_kernels`` and ``bitmap_rescale``. Everything is typed ``uint64``
explicitly: numba turns a mix of signed and unsigned 64-bit integers into float64.

Caching caveat: numba's on-disk cache (``cache=True``) keys each kernel on its own source
file only, so after editing this file, delete ``NUMBA_CACHE_DIR`` (``make clean``) or the
kernels in the other modules keep their old compiled copies of these helpers.
"""

from __future__ import annotations

import numpy as np
from numba import njit

try:  # an internal numba intrinsic: fall back to the SWAR form if a release drops it
    from numba.cpython.unsafe.numbers import trailing_zeros as _llvm_cttz
    _HAVE_CTTZ = True
except ImportError:  # pragma: no cover
    _HAVE_CTTZ = False

ALL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
ZERO = np.uint64(0)
ONE = np.uint64(1)
_M1 = np.uint64(0x5555_5555_5555_5555)
_M2 = np.uint64(0x3333_3333_3333_3333)
_M4 = np.uint64(0x0F0F_0F0F_0F0F_0F0F)
_H01 = np.uint64(0x0101_0101_0101_0101)
_S56 = np.uint64(56)


@njit(nogil=True, cache=True)
def tail_mask_u64(nbits):
    # valid bits of the last word of an nbits bitmap (all ones when nbits % 64 == 0)
    tail = nbits & 63
    if tail == 0:
        return ALL
    return (ONE << np.uint64(tail)) - ONE


@njit(nogil=True, cache=True)
def popcnt64(w):
    # SWAR: 2-bit, 4-bit, 8-bit partial sums, then add the 8 bytes with one multiply.
    w = w - ((w >> ONE) & _M1)
    w = (w & _M2) + ((w >> np.uint64(2)) & _M2)
    w = (w + (w >> np.uint64(4))) & _M4
    return (w * _H01) >> _S56


if _HAVE_CTTZ:
    @njit(nogil=True, cache=True)
    def ctz64(w):
        # w != 0 here; numba's intrinsic is LLVM cttz (one tzcnt/bsf instruction)
        return np.int64(_llvm_cttz(w))  # type: ignore[call-arg]
else:  # pragma: no cover - numba builds without the intrinsic
    @njit(nogil=True, cache=True)
    def ctz64(w):
        # w != 0 here. (w & -w) - 1 has exactly ctz(w) ones below the lowest set bit.
        return np.int64(popcnt64((w & (~w + ONE)) - ONE))
