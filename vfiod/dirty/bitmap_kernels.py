"""Fast dirty-bitmap kernels (numba ``@njit(nogil=True, cache=True)``), docs/architecture.md §3.

Same semantics, signatures and refusals as ``bitmap_ref`` (the specification); layout as in
docs/kernel-contract.md §3.9: little-endian u64 words, page ``i`` is bit ``i % 64`` of word ``i // 64``.

Why they are fast:
- everything works a word at a time: an unaligned merge or extract is two shifts and an OR
  per word (no loop per bit), and the loops have no carried dependency so LLVM vectorises;
- popcount is the SWAR bit trick per word (``bitmap_words``; LLVM recognises it and
  vectorises it);
- run extraction skips an all-zero or all-ones word in one step and walks the bits of a
  mixed word with count-trailing-zeros, one step per run edge.

``rescale`` lives in ``bitmap_rescale`` and is re-exported here, so this module has the
same functions as ``bitmap_ref``. The public functions are thin Python wrappers that
validate arguments (the same ``bitmap_args`` check as the reference) before entering a
kernel: numba does not bounds-check, so a kernel is only ever called with offsets and
lengths already proven to fit. The kernels release the GIL while they run.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from vfiod.dirty import bitmap_args, report_in_place
from vfiod.dirty.bitmap_args import Pages
from vfiod.dirty.bitmap_rescale import rescale
from vfiod.dirty.bitmap_words import ALL, ONE, ZERO, ctz64, popcnt64, tail_mask_u64
from vfiod.vfio.bitmap import Bitmap, words_for

__all__ = ["dirty_runs", "or_merge", "popcount", "rescale", "set_range", "test_and_clear"]


@njit(nogil=True, cache=True)
def _k_or_merge(dst, src, off, nbits):
    # Returns the set bits merged, counted while each source word is in a register (the
    # sync needs that count; a separate popcount pass read the source again).
    # The hot loops run over slices indexed from 0: numba then emits no negative-index
    # fix-up per access and LLVM vectorises them (about 1.6x faster than dst[w0 + k]).
    nsw = (nbits + 63) >> 6
    last = src[nsw - 1] & tail_mask_u64(nbits)
    total = popcnt64(last)
    w0 = off >> 6
    s = off & 63
    if s == 0:
        # Every word is stored, even where the source word is zero: skipping those stores
        # let LLVM emit masked stores, which on never-written (zero-page) memory cost a
        # fault per page on every call (a clean 1 TiB merge took 50 ms instead of 0.3).
        d = dst[w0 : w0 + nsw - 1]
        a = src[0 : nsw - 1]
        for k in range(d.shape[0]):
            d[k] |= a[k]
            total += popcnt64(a[k])
        dst[w0 + nsw - 1] |= last
        return np.int64(total)
    sl = np.uint64(s)
    sr = np.uint64(64 - s)
    if nsw == 1:
        dst[w0] |= last << sl
    else:
        dst[w0] |= src[0] << sl
        total += popcnt64(src[0])
        # dst word w0+k takes the low bits of src[k] and the high bits of src[k-1]; no
        # carried state, so the iterations are independent.
        d = dst[w0 + 1 : w0 + nsw - 1]
        a = src[1 : nsw - 1]
        b = src[0 : nsw - 2]
        for k in range(d.shape[0]):
            d[k] |= (a[k] << sl) | (b[k] >> sr)
            total += popcnt64(a[k])
        dst[w0 + nsw - 1] |= (last << sl) | (src[nsw - 2] >> sr)
    # The last word's high bits spill into one more dst word; they are only non-zero when
    # they are real (in-range) bits, and the wrapper proved those bits fit in dst.
    hi = last >> sr
    if hi != ZERO:
        dst[w0 + nsw] |= hi
    return np.int64(total)


@njit(nogil=True, cache=True)
def _k_popcount(words, nbits):
    full = nbits >> 6
    total = np.uint64(0)
    for k in range(full):
        total += popcnt64(words[k])
    if nbits & 63:
        total += popcnt64(words[full] & tail_mask_u64(nbits))
    return np.int64(total)


# inline="always" inlines at numba IR level: as a call per word it cost ~30% more
@njit(nogil=True, cache=True, inline="always")
def _word_runs(w, edge, base, first, count, ns, ne, longest):
    # Starts and ends of word w (edge = its edge word) are visited in two loops over set
    # bits, so there is no data-dependent branch per edge. Run r's start is written before
    # its end is seen, so count[r] = end - first[r] at once. Indices are unsigned: numba
    # then skips its negative-index wraparound test on every store.
    x = edge & w
    while x != ZERO:
        first[ns] = base + ctz64(x)
        x &= x - ONE
        ns += ONE
    x = edge & ~w
    while x != ZERO:
        length = base + ctz64(x) - first[ne]
        x &= x - ONE
        count[ne] = length
        longest = max(longest, length)
        ne += ONE
    return ns, ne, longest


@njit(nogil=True, cache=True)
def _k_runs(words, nbits, i0, first, count, state):
    # One pass from word i0. An all-zero or all-ones word that continues the previous state
    # has no edges and costs one test. A word adds at most 32 run starts (and the end closes
    # one more run): when first/count may not hold that, save the state and return the word
    # to resume at, for the caller to grow the arrays. Returns nw when done.
    # state (uint64): runs started, runs ended, previous word's bit 63, longest run.
    nw = (nbits + 63) >> 6
    ns = state[0]
    ne = state[1]
    prev = state[2]
    longest = np.int64(state[3])
    room = np.uint64(first.shape[0] - 33)
    stop = nw
    for i in range(i0, nw - 1):
        w = words[i]
        edge = w ^ ((w << ONE) | prev)
        if edge != ZERO:
            if ns > room:
                stop = i
                break
            ns, ne, longest = _word_runs(w, edge, np.int64(i) << 6, first, count, ns, ne,
                                         longest)
        prev = w >> np.uint64(63)
    if stop == nw and ns > room:
        stop = nw - 1
    if stop == nw:
        w = words[nw - 1] & tail_mask_u64(nbits)  # pages past nbits read as clean
        edge = w ^ ((w << ONE) | prev)
        ns, ne, longest = _word_runs(w, edge, np.int64(nw - 1) << 6, first, count, ns, ne,
                                     longest)
        if w >> np.uint64(63):  # the last page is dirty: the clean page past the end closes it
            length = nbits - first[ne]
            count[ne] = length
            longest = max(longest, length)
            ne += ONE
    state[0] = ns
    state[1] = ne
    state[2] = prev
    state[3] = np.uint64(longest)
    return stop


@njit(nogil=True, cache=True)
def _k_split_runs(first, count, max_run, out_first, out_count):
    # cut every run into max_run pieces plus a shorter last one; out_* sized exactly
    n = 0
    for r in range(first.shape[0]):
        start = first[r]
        length = count[r]
        while length > max_run:
            out_first[n] = start
            out_count[n] = max_run
            n += 1
            start += max_run
            length -= max_run
        out_first[n] = start
        out_count[n] = length
        n += 1


@njit(nogil=True, cache=True)
def _k_extract(words, first_bit, nbits, out):
    nw = words.shape[0]
    no = out.shape[0]
    w0 = first_bit >> 6
    s = first_bit & 63
    if s == 0:
        out[:] = words[w0 : w0 + no]
    else:
        # out word k = high bits of words[w0+k] and low bits of words[w0+k+1]; slices
        # indexed from 0 keep the loop free of index fix-ups (see _k_or_merge)
        sr = np.uint64(s)
        sl = np.uint64(64 - s)
        inner = min(no, nw - w0 - 1)  # out words that have a next source word
        o = out[0:inner]
        a = words[w0 : w0 + inner]
        b = words[w0 + 1 : w0 + 1 + inner]
        for k in range(inner):
            o[k] = (a[k] >> sr) | (b[k] << sl)
        if inner < no:
            out[no - 1] = words[nw - 1] >> sr
    out[no - 1] &= tail_mask_u64(nbits)


@njit(nogil=True, cache=True)
def _k_fill(words, first_bit, nbits, value):
    # Set (value=True) or clear bits [first_bit, first_bit+nbits); nbits > 0.
    end = first_bit + nbits
    w0 = first_bit >> 6
    w1 = (end - 1) >> 6
    lo_mask = ALL << np.uint64(first_bit & 63)
    hi_mask = tail_mask_u64(end)
    if w0 == w1:
        m = lo_mask & hi_mask
        if value:
            words[w0] |= m
        else:
            words[w0] &= ~m
        return
    fillw = ALL if value else ZERO
    if value:
        words[w0] |= lo_mask
        words[w1] |= hi_mask
    else:
        words[w0] &= ~lo_mask
        words[w1] &= ~hi_mask
    words[w0 + 1 : w1] = fillw


def or_merge(dst: Bitmap, src: Bitmap, dst_bit_offset: int, nbits: int) -> int:
    """OR bits ``[0, nbits)`` of ``src`` into ``dst`` at bit ``dst_bit_offset`` (any
    alignment); returns how many of those ``src`` bits are set."""
    dst, src, off, nbits = bitmap_args.or_merge_args(dst, src, dst_bit_offset, nbits)
    return int(_k_or_merge(dst, src, off, nbits)) if nbits else 0


def popcount(words: Bitmap, nbits: int | None = None) -> int:
    """Set bits among the first ``nbits`` bits (all of ``words`` if ``None``)."""
    words, n = bitmap_args.popcount_args(words, nbits)
    return int(_k_popcount(words, n)) if n else 0


def dirty_runs(words: Bitmap, nbits: int, max_run: int) -> tuple[Pages, Pages]:
    """Maximal runs of set bits, split at ``max_run``, as ``(first_page, count)`` int64 arrays.

    Without splitting, the two arrays are views of larger buffers whose unused tail was
    never written (so never committed to memory); copy them to keep them for long.
    """
    words, nbits, max_run = bitmap_args.dirty_runs_args(words, nbits, max_run)
    if nbits == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # Room for a run per 4 words to start with: np.empty commits only the pages written, so
    # a sparse bitmap costs little; a denser one makes the kernel stop, and we double.
    nw = words_for(nbits)
    cap = nw // 4 + 64
    first = np.empty(cap, np.int64)
    count = np.empty(cap, np.int64)
    state = np.zeros(4, np.uint64)
    i = 0
    while (i := _k_runs(words, nbits, i, first, count, state)) < nw:
        runs = int(state[0])
        cap *= 2
        first = np.concatenate([first[:runs], np.empty(cap - runs, np.int64)])
        count = np.concatenate([count[:runs], np.empty(cap - runs, np.int64)])
    runs = int(state[0])
    first, count = first[:runs], count[:runs]
    if int(state[3]) <= max_run:
        return first, count
    pieces = (count + (max_run - 1)) // max_run
    out_first = np.empty(int(pieces.sum()), np.int64)
    out_count = np.empty_like(out_first)
    _k_split_runs(first, count, max_run, out_first, out_count)
    return out_first, out_count


def test_and_clear(words: Bitmap, first_bit: int, nbits: int) -> Bitmap:
    """Return bits ``[first_bit, +nbits)`` as a new bitmap (bit 0 = ``first_bit``); clear them."""
    words, first, nbits = bitmap_args.bit_range_args("test_and_clear", words, first_bit, nbits)
    out = np.zeros(words_for(nbits), dtype=np.uint64)
    if nbits:
        _k_extract(words, first, nbits, out)
        _k_fill(words, first, nbits, False)
    return out


test_and_clear.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def set_range(words: Bitmap, first_bit: int, nbits: int) -> None:
    """Set bits ``[first_bit, first_bit + nbits)``; other bits untouched."""
    words, first, nbits = bitmap_args.bit_range_args("set_range", words, first_bit, nbits)
    if nbits:
        _k_fill(words, first, nbits, True)


def warm_up() -> None:
    """Compile or load every kernel a dirty sync and a pass use, now: a migration's first
    sync must not pay it, or its duration, the only sample of a one-pass migration,
    predicts a final sync many times too long (docs/architecture.md §4 fixed costs)."""
    words = np.zeros(4, np.uint64)
    or_merge(words, np.full(2, np.iinfo(np.uint64).max, np.uint64), 3, 70)   # a 70-page run
    popcount(words, 200)
    dirty_runs(words, 256, 4)          # split: longer than 4
    test_and_clear(words, 5, 100)
    set_range(words, 1, 3)
    report_in_place.warm_up()
