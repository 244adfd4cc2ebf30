"""Dirty-page state of one DMA mapping, and the two ways a kernel writes it to a caller's
bitmap (docs/kernel-contract.md §3.9 for type1, §4.4 for iommufd).

Bits are little-endian u64 words, bit ``i`` (word ``i // 64``, bit ``i % 64``) = page ``i``.
The words are a numpy ``uint64`` array held like type1's per-mapping bitmap: given at
START (and to a mapping made while tracking), kept and cleared in place by every query,
freed at STOP or unmap. ``np.zeros`` is ``calloc``, so a 1 TiB mapping costs no resident
memory until pages are really marked. (It used to be freed by every clear and allocated
again by the next mark: 8 MiB per 256 GiB mapping per query, page faults included.)

A map also records which words it marked since its last clear, up to 1/16 of its words:
clearing zeroes only those, and type1's answer for a sparse mapping takes them (read and
clear), zeroes the caller's words and puts them in, so the caller's bitmap comes back
through the cache as after the memset of an all-dirty answer, not after an 8 MiB copy
that also read as much (docs/benchmarks.md §2). Past the limit, the whole array is copied and
cleared, as the kernel always does; either way the caller's words hold the same bits.

Two writers, because the two kernels differ:

* type1 (``type1_copy_to_user``): per mapping, the kernel shifts its bitmap to the mapping's
  bit offset, ORs the caller's first word back in when the offset is not word aligned, then
  *overwrites* every following word with one copy — hence "hand in zeroed memory". An
  "every page dirty" answer (the non-pinned scope) is written with memset, never
  materialised as an array, so a 1 TiB sync is a few memory-bandwidth-bound calls.
* iommufd (``or_into_user``): bits are set in the caller's words (only ever OR), relative
  to the requested IOVA, at the requested page size.
"""

from __future__ import annotations

import array
import ctypes
import errno

import numpy as np

from vfiod.kernel.sim.base import fail

M64 = (1 << 64) - 1
_ONE = np.uint64(1)
#: A map records at most max(_RECORD_MIN, words // _RECORD_FRACTION) marked words (with
#: repeats); past that a sparse answer would not be cheaper than the copy.
_RECORD_FRACTION = 16
_RECORD_MIN = 64


def words_for(nbits: int) -> int:
    return (nbits + 63) // 64


def _range_mask(lo: int, hi: int) -> int:
    """Bits lo..hi-1 of one word (0 <= lo < hi <= 64)."""
    return ((1 << (hi - lo)) - 1) << lo


class DirtyMap:
    """One bit per page of a mapping of ``npages`` pages."""

    __slots__ = ("npages", "_words", "_starts", "_ends", "_recorded", "_marked")

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self._words: np.ndarray | None = None
        # word spans [start, end) marked since the last whole clear (None: too many), in
        # arrays numpy reads without a copy; _marked: the spans as word indices, once
        # asked for, until the next mark
        self._starts: array.array[int] | None = array.array("q")
        self._ends: array.array[int] = array.array("q")
        self._recorded = 0
        self._marked: np.ndarray | None = None

    @property
    def words(self) -> np.ndarray | None:
        """The bit array, or None if no page was marked since the last whole clear."""
        if self._words is None or (self._starts is not None and not self._starts):
            return None
        return self._words

    @property
    def storage(self) -> np.ndarray | None:
        """The array itself, marked or not (None before ``allocate`` and after
        ``release``): the kernel memory this map holds."""
        return self._words

    def allocate(self) -> None:
        """Give the map its zeroed bitmap (START, or a mapping made while tracking)."""
        if self._words is None:
            self._words = np.zeros(words_for(self.npages), dtype=np.uint64)
            self._forget_marks()

    def release(self) -> None:
        """Free the bitmap and its bits (STOP, unmap)."""
        self._words = None
        self._forget_marks()

    def _forget_marks(self) -> None:
        self._starts, self._ends = array.array("q"), array.array("q")
        self._recorded, self._marked = 0, None

    def marked_words(self) -> np.ndarray | None:
        """Indices (int64, sorted, unique) of every word that may hold a bit since the
        last whole clear, or None when more were marked than the record keeps."""
        if self._starts is None:
            return None
        if self._marked is None:
            starts = np.frombuffer(self._starts, dtype=np.int64)
            lens = np.frombuffer(self._ends, dtype=np.int64) - starts
            if lens.size and int(lens.max()) > 1:
                before = np.cumsum(lens) - lens
                starts = np.repeat(starts - before, lens) + np.arange(int(lens.sum()))
            # sort and drop repeats (np.unique hashes: several times slower here)
            idx = np.sort(starts)
            self._marked = idx[np.concatenate(([True], idx[1:] != idx[:-1]))] if idx.size \
                else idx
        return self._marked

    def take_marked(self) -> tuple[np.ndarray, np.ndarray]:
        """The recorded words (indices as ``marked_words``) and their values, which are
        cleared: a whole clear that hands back what it cleared. ValueError when more
        words were marked than the record keeps (``marked_words`` is None)."""
        marked = self.marked_words()
        if marked is None:
            raise ValueError("DirtyMap.take_marked: more words marked than the record keeps")
        if self._words is None or not marked.size:
            return marked, np.empty(0, dtype=np.uint64)
        got = self._words[marked]
        self._words[marked] = 0
        self._forget_marks()
        return marked, got

    def mark(self, first: int, count: int) -> None:
        """Set pages ``first .. first+count-1`` (clipped to the mapping)."""
        lo, hi = max(0, first), min(self.npages, first + count)
        if lo >= hi:
            return
        self.allocate()
        w = self._words
        assert w is not None
        wa, wb = lo >> 6, (hi - 1) >> 6
        self._marked = None
        if self._starts is not None:
            self._recorded += wb + 1 - wa
            if self._recorded > max(_RECORD_MIN, w.shape[0] // _RECORD_FRACTION):
                self._starts = None
            else:
                self._starts.append(wa)
                self._ends.append(wb + 1)
        if wa == wb:
            w[wa] |= np.uint64(_range_mask(lo & 63, ((hi - 1) & 63) + 1))
            return
        w[wa] |= np.uint64(_range_mask(lo & 63, 64))
        w[wa + 1:wb] = np.uint64(M64)
        w[wb] |= np.uint64(_range_mask(0, ((hi - 1) & 63) + 1))

    def clear(self, first: int = 0, count: int | None = None) -> None:
        """Clear pages ``first .. first+count-1`` (default: all). The array stays: the
        whole of it is cleared in place, only its recorded words when it has them."""
        if self._words is None:
            return
        w = self._words
        if first <= 0 and (count is None or first + count >= self.npages):
            marked = self.marked_words()
            if marked is None:
                w.fill(0)
            elif marked.size:
                w[marked] = 0
            self._forget_marks()
            return
        hi = self.npages if count is None else min(self.npages, first + count)
        lo = max(0, first)
        if lo >= hi:
            return
        wa, wb = lo >> 6, (hi - 1) >> 6
        if wa == wb:
            w[wa] &= np.uint64(M64 ^ _range_mask(lo & 63, ((hi - 1) & 63) + 1))
            return
        w[wa] &= np.uint64(M64 ^ _range_mask(lo & 63, 64))
        w[wa + 1:wb] = 0
        w[wb] &= np.uint64(M64 ^ _range_mask(0, ((hi - 1) & 63) + 1))

    def count(self) -> int:
        """Number of dirty pages."""
        words = self.words
        if words is None:
            return 0
        return int(np.bitwise_count(words).sum())

    def pages(self, first: int = 0, count: int | None = None) -> np.ndarray:
        """Indices (int64) of the dirty pages in ``first .. first+count-1``. Cost grows with
        the number of non-zero words, not with the mapping size."""
        hi = self.npages if count is None else min(self.npages, first + count)
        lo = max(0, first)
        words = self.words
        if words is None or lo >= hi:
            return np.empty(0, dtype=np.int64)
        wa, wb = lo >> 6, (hi - 1) >> 6
        sub = words[wa:wb + 1]
        nz = np.flatnonzero(sub)
        if nz.size == 0:
            return np.empty(0, dtype=np.int64)
        bits = np.unpackbits(sub[nz].view(np.uint8), bitorder="little").reshape(-1, 64)
        row, col = np.nonzero(bits)
        idx = (nz[row].astype(np.int64) + wa) * 64 + col
        return idx[(idx >= lo) & (idx < hi)]


def _user_words(addr: int, nwords: int, op: str) -> np.ndarray:
    if addr == 0:
        raise fail(errno.EFAULT, op, detail="NULL bitmap pointer")
    return np.ctypeslib.as_array((ctypes.c_uint64 * nwords).from_address(addr))


#: Bytes per piece of ``_cached_copy``: below glibc's non-temporal threshold (about 3/4
#: of a thread's share of the last-level cache), so every piece is a plain cached copy.
_COPY_PIECE = 256 << 10


def _cached_copy(dst: int, src: int, nbytes: int) -> None:
    """memmove in pieces. One large glibc memmove switches to non-temporal stores, which
    leave the caller's bitmap out of the cache; the kernel's copy_to_user (``rep movsb``)
    stores through the cache, and the caller's next pass over the bitmap (vfiod's count)
    finds it there: measured on 8 MiB, that pass took 0.19 ms after one memmove, 0.13 ms
    after pieces of 256 KiB, 0.11 ms after a memset (docs/benchmarks.md §2)."""
    for off in range(0, nbytes, _COPY_PIECE):
        ctypes.memmove(dst + off, src + off, min(_COPY_PIECE, nbytes - off))


def _shifted_copy(out: np.ndarray, words: np.ndarray, shift: int) -> None:
    """out = words shifted up by ``shift`` (1..63) bits, word by word, a piece at a time
    (no temporary as large as the mapping)."""
    n, up, down = words.shape[0], np.uint64(shift), np.uint64(64 - shift)
    piece = _COPY_PIECE // 8
    for a in range(0, out.shape[0], piece):
        seg = out[a:a + piece]
        k = max(0, min(seg.shape[0], n - a))
        np.left_shift(words[a:a + k], up, out=seg[:k])
        seg[k:] = 0
        lo = max(a, 1)                  # word j also takes the top bits of word j - 1
        src_end = min(a + seg.shape[0] - 1, n)
        if src_end > lo - 1:
            seg[lo - a:lo - a + src_end - (lo - 1)] |= words[lo - 1:src_end] >> down


def _all_ones_to_user(dst: int, shift: int, nbits: int, leftover: int) -> None:
    """``nbits`` one bits from bit ``shift`` of the word at ``dst`` (whose lower bits are
    ``leftover``), the last word's bits past them 0: a memset, no array."""
    end = shift + nbits                       # bit just past the mapping, from word 0
    nout = words_for(end)
    first = ctypes.c_uint64.from_address(dst)
    if nout == 1:
        first.value = leftover | _range_mask(shift, end)
        return
    first.value = leftover | _range_mask(shift, 64)
    if nout > 2:
        ctypes.memset(dst + 8, 0xFF, (nout - 2) * 8)
    last_bits = end - 64 * (nout - 1)
    ctypes.c_uint64.from_address(dst + 8 * (nout - 1)).value = _range_mask(0, last_bits)


def type1_copy_to_user(addr: int, bit_offset: int, nbits: int, dm: DirtyMap,
                       all_dirty: bool, op: str) -> None:
    """Write one mapping's ``nbits`` bits (``dm``) at ``bit_offset`` of the bitmap at
    ``addr`` the way type1's ``update_user_bitmap`` does, then clear ``dm`` (the GET's
    read-and-clear): the first word keeps the caller's bits when the offset is not word
    aligned; every other word it covers is overwritten."""
    if nbits <= 0:
        return
    if addr == 0:
        raise fail(errno.EFAULT, op, detail="NULL bitmap pointer")
    shift = bit_offset & 63
    dst = addr + (bit_offset >> 6) * 8
    nout = words_for(nbits + shift)
    leftover = ctypes.c_uint64.from_address(dst).value if shift else 0
    if all_dirty:
        _all_ones_to_user(dst, shift, nbits, leftover)
        dm.clear()                            # the bitmap it set and copied, cleared
        return
    words = dm.words
    if words is not None and dm.marked_words() is None:
        # Too many words to name: the kernel's one copy_to_user of the whole bitmap.
        if shift == 0:
            _cached_copy(dst, words.ctypes.data, nout * 8)
        else:
            out = _user_words(dst, nout, op)
            _shifted_copy(out, words, shift)
            out[0] |= np.uint64(leftover)
        dm.clear()
        return
    # Nothing marked, or a few words: those are taken (read and cleared) first, then the
    # caller's words zeroed and the taken ones put in, so that what the caller finds in
    # its cache after the answer is its own words, as after an all-dirty memset.
    marked, got = dm.take_marked()
    ctypes.memset(dst, 0, nout * 8)
    out = _user_words(dst, nout, op)
    if shift == 0:
        out[marked] = got
        return
    out[0] = np.uint64(leftover)
    out[marked] |= got << np.uint64(shift)
    carry = marked + 1 < nout
    out[marked[carry] + 1] |= got[carry] >> np.uint64(64 - shift)


def or_into_user(addr: int, nbits_total: int, dm: DirtyMap, first_page: int, npages: int,
                 bit_offset: int, scale_shift: int, op: str) -> None:
    """OR the dirty pages ``first_page .. +npages-1`` of ``dm`` into the user bitmap at
    ``addr`` (``nbits_total`` bits long), page ``first_page`` landing on ``bit_offset``.
    With ``scale_shift`` = log2(report page size / tracking page size) > 0, a report bit
    is set when any page it covers is dirty (``bit_offset`` is then in tracking pages)."""
    if dm.words is None or npages <= 0:
        return
    nwords = words_for(nbits_total)
    if scale_shift == 0 and first_page % 64 == 0:
        # Fast path (word-aligned source): shift whole words, no per-bit work.
        src = dm.words[first_page >> 6:words_for(first_page + npages)].copy()
        tail = npages & 63
        if tail:
            src[-1] &= np.uint64(_range_mask(0, tail))
        shift = bit_offset & 63
        base = bit_offset >> 6
        n = len(src)
        nout = min(words_for(npages + shift), nwords - base)
        out = np.zeros(words_for(npages + shift), dtype=np.uint64)
        if shift == 0:
            out[:n] = src
        else:
            out[:n] = src << np.uint64(shift)
            m = min(n, len(out) - 1)
            out[1:1 + m] |= src[:m] >> np.uint64(64 - shift)
        view = _user_words(addr, nwords, op)
        view[base:base + nout] |= out[:nout]
        return
    pages = dm.pages(first_page, npages)
    if pages.size == 0:
        return
    bits = np.unique((pages - first_page + bit_offset) >> scale_shift)
    bits = bits[bits < nbits_total]
    view = _user_words(addr, nwords, op)
    np.bitwise_or.at(view, bits >> 6, np.left_shift(_ONE, (bits & 63).astype(np.uint64)))
