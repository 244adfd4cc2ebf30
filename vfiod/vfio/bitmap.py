"""Dirty-bitmap buffers handed to the kernel (docs/kernel-contract.md §3.8, §3.9, §4.4, §7).

Every dirty ioctl writes a little-endian array of u64 words, bit *i* = page ``iova + i*pgsize``
relative to the requested iova, and leaves some words alone (iommufd and DMA logging only
set bits; type1 skips holes between mappings), so the buffer is zeroed before each call
unless every word will be written (docs/kernel-contract.md §11.5). These helpers size, check
and zero such buffers and OR a partial bitmap into a larger one at a bit offset that need
not be 64-aligned (used when one query is split into several kernel calls). The fast
merge kernels live in ``vfiod.dirty``; this is the small numpy version the vfio layer
needs for its own splitting.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Bitmap = npt.NDArray[np.uint64]


def pages(length: int, pgsize: int) -> int:
    """Pages covered by ``length`` bytes (rounded up)."""
    return -(-length // pgsize)


def words_for(npages: int) -> int:
    """u64 words needed for ``npages`` bits."""
    return -(-npages // 64)


def prepare(out: Bitmap | None, npages: int, what: str, clear: bool = True) -> Bitmap:
    """A zeroed u64 bitmap of at least ``words_for(npages)`` words: ``out`` (checked and
    cleared in place) or a new array. The kernel writes through a raw pointer, so ``out``
    must be a writable, C-contiguous uint64 array. ``clear=False`` leaves ``out``'s words
    as they are, for a caller that knows the kernel will write every one of them."""
    need = words_for(npages)
    if out is None:
        return np.zeros(need, dtype=np.uint64)
    if not isinstance(out, np.ndarray) or out.dtype != np.uint64 or out.ndim != 1:
        raise TypeError(f"{what}: out must be a 1-D numpy uint64 array")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{what}: out must be C-contiguous and writable")
    if out.size < need:
        raise ValueError(f"{what}: out has {out.size} words, {need} needed for {npages} pages")
    if clear:
        out[:need] = 0
    return out


def or_at(dst: Bitmap, src: Bitmap, nbits: int, bit_offset: int) -> None:
    """``dst`` |= the first ``nbits`` bits of ``src`` shifted to start at ``bit_offset``."""
    if nbits <= 0:
        return
    n = words_for(nbits)
    part = src[:n].copy()
    tail = nbits % 64
    if tail:
        part[-1] &= np.uint64((1 << tail) - 1)    # never spill bits past the range
    w0, shift = divmod(bit_offset, 64)
    if shift == 0:
        dst[w0:w0 + n] |= part
        return
    lo = part << np.uint64(shift)
    hi = part >> np.uint64(64 - shift)
    dst[w0:w0 + n] |= lo
    end = min(w0 + 1 + n, dst.size)
    dst[w0 + 1:end] |= hi[:end - (w0 + 1)]
