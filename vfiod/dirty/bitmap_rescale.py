"""Page-size rescaling of a dirty bitmap (numba kernels), docs/architecture.md §3.

Used when the IOMMU page size of a container (``pgsize`` of docs/kernel-contract.md §3.9, or an
iommufd ``page_size``, §4.4) differs from the guest page size of the global bitmap.
Semantics are ``bitmap_ref.rescale`` (the specification): coarser pages are dirty if any
page they cover is; finer pages are dirty if the page covering them is. Both sizes are
powers of two, so one page of the coarser size covers exactly ``ratio`` of the finer.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from vfiod.dirty.bitmap_args import rescale_args, rescaled_nbits, tail_mask
from vfiod.dirty.bitmap_words import ALL, ONE, ZERO, ctz64, tail_mask_u64
from vfiod.vfio.bitmap import Bitmap, words_for


@njit(nogil=True, cache=True)
def _ceil_div(a, b):
    return (a + b - 1) // b


@njit(nogil=True, cache=True)
def _src_word(src, k, nsw, nbits):
    # source word k, with the bits past nbits of the last word read as clean
    if k == nsw - 1:
        return src[k] & tail_mask_u64(nbits)
    return src[k]


@njit(nogil=True, cache=True)
def _k_coarsen(src, nbits, ratio, out):
    # out bit j = OR of src bits [j*ratio, (j+1)*ratio); ratio a power of two >= 2.
    nsw = (nbits + 63) >> 6
    if ratio >= 64:
        per = ratio >> 6  # whole src words per dst bit
        for j in range(_ceil_div(nbits, ratio)):
            acc = ZERO
            for k in range(j * per, min((j + 1) * per, nsw)):
                acc |= _src_word(src, k, nsw, nbits)
            if acc != ZERO:
                out[j >> 6] |= ONE << np.uint64(j & 63)
        return
    groups = 64 // ratio  # dst bits produced by one src word
    for k in range(nsw):
        v = _src_word(src, k, nsw, nbits)
        if v == ZERO:
            continue
        # fold each ratio-bit group onto its lowest bit, then gather those bits
        sh = 1
        while sh < ratio:
            v |= v >> np.uint64(sh)
            sh <<= 1
        packed = ZERO
        for g in range(groups):
            packed |= ((v >> np.uint64(g * ratio)) & ONE) << np.uint64(g)
        j = k * groups
        out[j >> 6] |= packed << np.uint64(j & 63)


@njit(nogil=True, cache=True)
def _k_refine(src, nbits, ratio, out):
    # src bit i sets out bits [i*ratio, (i+1)*ratio); ratio a power of two >= 2.
    nsw = (nbits + 63) >> 6
    for k in range(nsw):
        v = _src_word(src, k, nsw, nbits)
        if v == ZERO:
            continue
        if ratio >= 64:
            per = ratio >> 6  # whole out words per src bit
            while v != ZERO:
                b = ctz64(v)
                v &= v - ONE
                base = ((k << 6) + b) * per
                for m in range(base, base + per):
                    out[m] = ALL
        else:
            # each set src bit b lands in out word k*ratio + b // per_word as a ratio-bit group
            group = (ONE << np.uint64(ratio)) - ONE
            per_word = 64 // ratio
            while v != ZERO:
                b = ctz64(v)
                v &= v - ONE
                out[k * ratio + b // per_word] |= group << np.uint64((b % per_word) * ratio)


def rescale(src: Bitmap, src_pgsize: int, dst_pgsize: int, nbits: int) -> Bitmap:
    """The first ``nbits`` pages of ``src`` in ``dst_pgsize`` pages; see ``bitmap_ref.rescale``."""
    src, sp, dp, nbits = rescale_args(src, src_pgsize, dst_pgsize, nbits)
    out = np.zeros(words_for(rescaled_nbits(nbits, sp, dp)), dtype=np.uint64)
    if nbits == 0:
        return out
    if dp == sp:
        out[:] = src[: out.shape[0]]
        out[-1] &= np.uint64(tail_mask(nbits))
    elif dp > sp:
        _k_coarsen(src, nbits, dp // sp, out)
    else:
        _k_refine(src, nbits, sp // dp, out)
    return out
