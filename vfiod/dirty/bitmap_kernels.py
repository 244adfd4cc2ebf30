"""Fast dirty-bitmap kernels (numba ``@njit(nogil=True, cache=True)``), design.md §3.

Same semantics, signatures and refusals as ``bitmap_ref`` (the specification); layout as in
vfio-uapi.md §3.9: little-endian u64 words, page ``i`` is bit ``i % 64`` of word ``i // 64``.

Why they are fast:
- everything works a word at a time: an unaligned merge or extract is two shifts and an OR
  per word (no loop per bit), and the loops have no carried dependency so LLVM vectorises;
- popcount is the SWAR bit trick per word (LLVM turns it into ``popcnt`` where it exists);
- run extraction skips an all-zero or all-ones word in one step and walks the bits of a
  mixed word with count-trailing-zeros, one step per run edge.

The public functions are thin Python wrappers that validate arguments (``bitmap_args``)
before entering a kernel: numba does not bounds-check, so a kernel is only ever called
with offsets and lengths already proven to fit. They release the GIL while they run.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from vfiod.dirty.bitmap_args import (
    WORD_BITS,
    Pages,
    Words,
    check_count,
    check_disjoint,
    check_page_size,
    check_span,
    check_words,
    rescaled_nbits,
    tail_mask,
    words_for,
)

try:  # an internal numba intrinsic: fall back to the SWAR form if a release drops it
    from numba.cpython.unsafe.numbers import trailing_zeros as _llvm_cttz
    _HAVE_CTTZ = True
except ImportError:  # pragma: no cover
    _HAVE_CTTZ = False

_ALL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_ZERO = np.uint64(0)
_ONE = np.uint64(1)
_M1 = np.uint64(0x5555_5555_5555_5555)
_M2 = np.uint64(0x3333_3333_3333_3333)
_M4 = np.uint64(0x0F0F_0F0F_0F0F_0F0F)
_H01 = np.uint64(0x0101_0101_0101_0101)
_S56 = np.uint64(56)



@njit(nogil=True, cache=True)
def _tail_mask(nbits):
    tail = nbits & 63
    if tail == 0:
        return _ALL
    return (_ONE << np.uint64(tail)) - _ONE


@njit(nogil=True, cache=True)
def _popcnt64(w):
    # SWAR: 2-bit, 4-bit, 8-bit partial sums, then add the 8 bytes with one multiply.
    w = w - ((w >> _ONE) & _M1)
    w = (w & _M2) + ((w >> np.uint64(2)) & _M2)
    w = (w + (w >> np.uint64(4))) & _M4
    return (w * _H01) >> _S56


if _HAVE_CTTZ:
    @njit(nogil=True, cache=True)
    def _ctz64(w):
        # w != 0 here; numba's intrinsic is LLVM cttz (one tzcnt/bsf instruction)
        return np.int64(_llvm_cttz(w))  # type: ignore[call-arg]
else:  # pragma: no cover - numba builds without the intrinsic
    @njit(nogil=True, cache=True)
    def _ctz64(w):
        # w != 0 here. (w & -w) - 1 has exactly ctz(w) ones below the lowest set bit.
        return np.int64(_popcnt64((w & (~w + _ONE)) - _ONE))


@njit(nogil=True, cache=True)
def _k_or_merge(dst, src, off, nbits):
    # The hot loops run over slices indexed from 0: numba then emits no negative-index
    # fix-up per access and LLVM vectorises them (about 1.6x faster than dst[w0 + k]).
    nsw = (nbits + 63) >> 6
    last = src[nsw - 1] & _tail_mask(nbits)
    w0 = off >> 6
    s = off & 63
    if s == 0:
        d = dst[w0 : w0 + nsw - 1]
        a = src[0 : nsw - 1]
        for k in range(d.shape[0]):
            d[k] |= a[k]
        dst[w0 + nsw - 1] |= last
        return
    sl = np.uint64(s)
    sr = np.uint64(64 - s)
    if nsw == 1:
        dst[w0] |= last << sl
    else:
        dst[w0] |= src[0] << sl
        # dst word w0+k takes the low bits of src[k] and the high bits of src[k-1]; no
        # carried state, so the iterations are independent.
        d = dst[w0 + 1 : w0 + nsw - 1]
        a = src[1 : nsw - 1]
        b = src[0 : nsw - 2]
        for k in range(d.shape[0]):
            d[k] |= (a[k] << sl) | (b[k] >> sr)
        dst[w0 + nsw - 1] |= (last << sl) | (src[nsw - 2] >> sr)
    # The last word's high bits spill into one more dst word; they are only non-zero when
    # they are real (in-range) bits, and the wrapper proved those bits fit in dst.
    hi = last >> sr
    if hi != _ZERO:
        dst[w0 + nsw] |= hi


@njit(nogil=True, cache=True)
def _k_popcount(words, nbits):
    full = nbits >> 6
    total = np.uint64(0)
    for k in range(full):
        total += _popcnt64(words[k])
    if nbits & 63:
        total += _popcnt64(words[full] & _tail_mask(nbits))
    return np.int64(total)


@njit(nogil=True, cache=True)
def _starts(w, prev):
    # bit b set where page b is dirty and the page before it (bit b-1, or the previous
    # word's bit 63 passed in as prev = 0/1) is clean
    return w & ~((w << _ONE) | prev)


@njit(nogil=True, cache=True)
def _k_count_runs(words, nbits):
    # popcount of the run-start words; each reads its own previous word instead of carrying
    # it, so the iterations are independent and LLVM vectorises the loop
    nw = (nbits + 63) >> 6
    runs = _popcnt64(_starts(words[0] & _tail_mask(nbits) if nw == 1 else words[0], _ZERO))
    for i in range(1, nw - 1):
        runs += _popcnt64(_starts(words[i], words[i - 1] >> np.uint64(63)))
    if nw > 1:
        runs += _popcnt64(_starts(words[nw - 1] & _tail_mask(nbits),
                                  words[nw - 2] >> np.uint64(63)))
    return np.int64(runs)


# inline="always" inlines at numba IR level: as a call per word it cost ~30% more
@njit(nogil=True, cache=True, inline="always")
def _word_runs(w, edge, base, first, count, ns, ne, longest):
    # Starts and ends of word w (edge = its edge word) are visited in two loops over set
    # bits, so there is no data-dependent branch per edge. Run r's start is written before
    # its end is seen, so count[r] = end - first[r] at once. Indices are unsigned: numba
    # then skips its negative-index wraparound test on every store.
    x = edge & w
    while x != _ZERO:
        first[ns] = base + _ctz64(x)
        x &= x - _ONE
        ns += _ONE
    x = edge & ~w
    while x != _ZERO:
        length = base + _ctz64(x) - first[ne]
        x &= x - _ONE
        count[ne] = length
        longest = max(longest, length)
        ne += _ONE
    return ns, ne, longest


@njit(nogil=True, cache=True)
def _k_runs(words, nbits, first, count):
    # An all-zero or all-ones word that continues the previous state has no edges and costs
    # one test. first/count hold exactly _k_count_runs entries. Returns the longest run.
    nw = (nbits + 63) >> 6
    ns = _ZERO
    ne = _ZERO
    longest = 0
    prev = _ZERO
    for i in range(nw - 1):
        w = words[i]
        edge = w ^ ((w << _ONE) | prev)
        prev = w >> np.uint64(63)
        if edge != _ZERO:
            ns, ne, longest = _word_runs(w, edge, np.int64(i) << 6, first, count, ns, ne,
                                         longest)
    w = words[nw - 1] & _tail_mask(nbits)  # pages past nbits read as clean
    edge = w ^ ((w << _ONE) | prev)
    ns, ne, longest = _word_runs(w, edge, np.int64(nw - 1) << 6, first, count, ns, ne, longest)
    if w >> np.uint64(63):  # the last page is dirty: the clean page past the end closes it
        length = nbits - first[ne]
        count[ne] = length
        longest = max(longest, length)
    return longest


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
    out[no - 1] &= _tail_mask(nbits)


@njit(nogil=True, cache=True)
def _k_fill(words, first_bit, nbits, value):
    # Set (value=True) or clear bits [first_bit, first_bit+nbits); nbits > 0.
    end = first_bit + nbits
    w0 = first_bit >> 6
    w1 = (end - 1) >> 6
    lo_mask = _ALL << np.uint64(first_bit & 63)
    hi_mask = _tail_mask(end)
    if w0 == w1:
        m = lo_mask & hi_mask
        if value:
            words[w0] |= m
        else:
            words[w0] &= ~m
        return
    fillw = _ALL if value else _ZERO
    if value:
        words[w0] |= lo_mask
        words[w1] |= hi_mask
    else:
        words[w0] &= ~lo_mask
        words[w1] &= ~hi_mask
    words[w0 + 1 : w1] = fillw


@njit(nogil=True, cache=True)
def _ceil_div(a, b):
    return (a + b - 1) // b


@njit(nogil=True, cache=True)
def _k_coarsen(src, nbits, ratio, out):
    # out bit j = OR of src bits [j*ratio, (j+1)*ratio); ratio a power of two >= 2.
    nsw = (nbits + 63) >> 6
    if ratio >= 64:
        per = ratio >> 6  # whole src words per dst bit
        for j in range(_ceil_div(nbits, ratio)):
            acc = _ZERO
            for k in range(j * per, min((j + 1) * per, nsw)):
                v = src[k]
                if k == nsw - 1:
                    v &= _tail_mask(nbits)
                acc |= v
            if acc != _ZERO:
                out[j >> 6] |= _ONE << np.uint64(j & 63)
        return
    groups = 64 // ratio  # dst bits produced by one src word
    for k in range(nsw):
        v = src[k]
        if k == nsw - 1:
            v &= _tail_mask(nbits)
        if v == _ZERO:
            continue
        # fold each ratio-bit group onto its lowest bit, then gather those bits
        sh = 1
        while sh < ratio:
            v |= v >> np.uint64(sh)
            sh <<= 1
        packed = _ZERO
        for g in range(groups):
            packed |= ((v >> np.uint64(g * ratio)) & _ONE) << np.uint64(g)
        j = k * groups
        out[j >> 6] |= packed << np.uint64(j & 63)


@njit(nogil=True, cache=True)
def _k_refine(src, nbits, ratio, out):
    # src bit i sets out bits [i*ratio, (i+1)*ratio); ratio a power of two >= 2.
    nsw = (nbits + 63) >> 6
    for k in range(nsw):
        v = src[k]
        if k == nsw - 1:
            v &= _tail_mask(nbits)
        if v == _ZERO:
            continue
        if ratio >= 64:
            per = ratio >> 6  # whole out words per src bit
            while v != _ZERO:
                b = _ctz64(v)
                v &= v - _ONE
                base = ((k << 6) + b) * per
                for m in range(base, base + per):
                    out[m] = _ALL
        else:
            # each set src bit b lands in out word k*ratio + b // per_word as a ratio-bit group
            group = (_ONE << np.uint64(ratio)) - _ONE
            per_word = 64 // ratio
            while v != _ZERO:
                b = _ctz64(v)
                v &= v - _ONE
                out[k * ratio + b // per_word] |= group << np.uint64((b % per_word) * ratio)


def or_merge(dst: Words, src: Words, dst_bit_offset: int, nbits: int) -> None:
    """OR bits ``[0, nbits)`` of ``src`` into ``dst`` at bit ``dst_bit_offset`` (any alignment)."""
    fn = "or_merge"
    dst = check_words(fn, "dst", dst, writable=True)
    src = check_words(fn, "src", src)
    off = check_count(fn, "dst_bit_offset", dst_bit_offset)
    nbits = check_count(fn, "nbits", nbits)
    check_span(fn, "src", src, 0, nbits)
    check_span(fn, "dst", dst, off, nbits)
    check_disjoint(fn, "dst", dst, "src", src)
    if nbits:
        _k_or_merge(dst, src, off, nbits)


def popcount(words: Words, nbits: int | None = None) -> int:
    """Set bits among the first ``nbits`` bits (all of ``words`` if ``None``)."""
    fn = "popcount"
    words = check_words(fn, "words", words)
    n = words.shape[0] * WORD_BITS if nbits is None else check_count(fn, "nbits", nbits)
    check_span(fn, "words", words, 0, n)
    return int(_k_popcount(words, n)) if n else 0


def dirty_runs(words: Words, nbits: int, max_run: int) -> tuple[Pages, Pages]:
    """Maximal runs of set bits, split at ``max_run``, as ``(first_page, count)`` int64 arrays."""
    fn = "dirty_runs"
    words = check_words(fn, "words", words)
    nbits = check_count(fn, "nbits", nbits)
    max_run = check_count(fn, "max_run", max_run, minimum=1)
    check_span(fn, "words", words, 0, nbits)
    if nbits == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    runs = _k_count_runs(words, nbits)
    first = np.empty(runs, np.int64)
    count = np.empty(runs, np.int64)
    if runs == 0 or _k_runs(words, nbits, first, count) <= max_run:
        return first, count
    pieces = (count + (max_run - 1)) // max_run
    out_first = np.empty(int(pieces.sum()), np.int64)
    out_count = np.empty_like(out_first)
    _k_split_runs(first, count, max_run, out_first, out_count)
    return out_first, out_count


def test_and_clear(words: Words, first_bit: int, nbits: int) -> Words:
    """Return bits ``[first_bit, +nbits)`` as a new bitmap (bit 0 = ``first_bit``); clear them."""
    fn = "test_and_clear"
    words = check_words(fn, "words", words, writable=True)
    first = check_count(fn, "first_bit", first_bit)
    nbits = check_count(fn, "nbits", nbits)
    check_span(fn, "words", words, first, nbits)
    out = np.zeros(words_for(nbits), dtype=np.uint64)
    if nbits:
        _k_extract(words, first, nbits, out)
        _k_fill(words, first, nbits, False)
    return out


test_and_clear.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def set_range(words: Words, first_bit: int, nbits: int) -> None:
    """Set bits ``[first_bit, first_bit + nbits)``; other bits untouched."""
    fn = "set_range"
    words = check_words(fn, "words", words, writable=True)
    first = check_count(fn, "first_bit", first_bit)
    nbits = check_count(fn, "nbits", nbits)
    check_span(fn, "words", words, first, nbits)
    if nbits:
        _k_fill(words, first, nbits, True)


def rescale(src: Words, src_pgsize: int, dst_pgsize: int, nbits: int) -> Words:
    """The first ``nbits`` pages of ``src`` in ``dst_pgsize`` pages; see ``bitmap_ref.rescale``."""
    fn = "rescale"
    src = check_words(fn, "src", src)
    sp = check_page_size(fn, "src_pgsize", src_pgsize)
    dp = check_page_size(fn, "dst_pgsize", dst_pgsize)
    nbits = check_count(fn, "nbits", nbits)
    check_span(fn, "src", src, 0, nbits)
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
