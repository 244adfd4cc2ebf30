"""A type1 dirty report written straight into the guest's bitmap (docs/architecture.md §3;
docs/kernel-contract.md §3.9).

type1's GET_BITMAP copies each mapping's bits over the caller's words: it cannot OR into
a bitmap that already holds bits. So every report used to go to a scratch buffer as large
as the largest mapping (zeroed, written, then OR-merged into the guest's bitmap): at 4
containers of a quarter of the RAM each, 0.25 of the bitmap's size more memory, and a
zeroing, a write and three more passes of memory traffic per sync.

Most of the time the words a report lands on hold almost nothing the report could
destroy: the RAM sender took every dirty bit since the last sync, or another container
over the same RAM left a few bits there (or, for a type1 that reports everything, all of
them). ``report_in_place`` reads the words once (not at all when the caller knows them
all 0 or all 1: ``GlobalBitmap`` remembers which words it gave to reports since the sender
last took everything, and which reports left all ones), saves those that differ from all-zero (or from all-ones, whichever is
rarer) as (index, value) pairs, lets the kernel write the report over the words, then
counts the report's bits and ORs the saved words back. The
result is the OR-merge a scratch buffer gives, bit for bit. The save is allowed 1/32 of
the range's words (1/16 of its bytes); words that would need more make it decline, and the
caller uses the scratch buffer instead (e.g. the first sync after "everything dirty" in
an mdev container whose earlier bits the sender has not taken).

The saved words are put back also when the report fails, so no bit is lost either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from numba import njit

from vfiod.dirty.bitmap_args import check_count, check_words
from vfiod.dirty.bitmap_words import ALL, ZERO, popcnt64, tail_mask_u64
from vfiod.vfio.bitmap import Bitmap, words_for

#: A range of n words may save at most max(SAVE_MIN_WORDS, n // SAVE_FRACTION) words.
SAVE_FRACTION = 32
SAVE_MIN_WORDS = 64


@njit(nogil=True, cache=True)
def _k_unlike(seg):
    # one read pass: words that are not all-zero, words that are not all-ones
    nonzero = 0
    notall = 0
    for k in range(seg.shape[0]):
        w = seg[k]
        nonzero += w != ZERO
        notall += w != ALL
    return nonzero, notall


@njit(nogil=True, cache=True)
def _k_save(seg, fill, idx, val):
    # the words that differ from fill, in order (idx/val sized for exactly those)
    n = 0
    for k in range(seg.shape[0]):
        w = seg[k]
        if w != fill:
            idx[n] = k
            val[n] = w
            n += 1


@njit(nogil=True, cache=True)
def _k_count_restore(seg, nbits, fill, idx, val):
    # The report's set bits among its nbits, every word back to report | old (old was fill
    # except at the saved words), and how many bits that added to the words: the caller
    # keeps its count of dirty pages up to date without a pass of its own; and whether
    # every word is all ones after (False may be wrong, True never is). One pass: an
    # all-zero fill stores only the saved words; an all-ones fill stores each word right
    # after counting it (the saved words take the report's bits first).
    nw = seg.shape[0]
    mask = tail_mask_u64(nbits)
    added = np.int64(0)
    if fill == ZERO:
        whole = np.int64(0)
        every = ALL
        for k in range(nw - 1):
            whole += np.int64(popcnt64(seg[k]))
            every &= seg[k]
        last = seg[nw - 1]
        every &= last
        total = whole + np.int64(popcnt64(last & mask))
        added = whole + np.int64(popcnt64(last))   # every word was 0 but the saved ones
        for j in range(idx.shape[0]):
            r = seg[idx[j]]
            v = val[j]
            both = r | v
            added += (np.int64(popcnt64(both)) - np.int64(popcnt64(r))
                      - np.int64(popcnt64(v)))
            seg[idx[j]] = both
        return total, added, every == ALL
    for j in range(idx.shape[0]):       # every word was all ones but the saved ones
        both = seg[idx[j]] | val[j]
        added += np.int64(popcnt64(both)) - np.int64(popcnt64(val[j]))
        val[j] = both
    total = np.int64(0)
    body = seg[0:nw - 1]
    for k in range(body.shape[0]):
        total += np.int64(popcnt64(body[k]))
        body[k] = ALL
    total += np.int64(popcnt64(seg[nw - 1] & mask))
    seg[nw - 1] = ALL
    for j in range(idx.shape[0]):
        seg[idx[j]] = val[j]
    return total, added, idx.shape[0] == 0


class InPlace(NamedTuple):
    """What ``report_in_place`` did: the report's set bits, the bits it added to the
    words (those not already set), and whether the words are now all ones."""

    reported: int
    added: int
    full: bool


def report_in_place(words: Bitmap, first_bit: int, nbits: int,
                    write: Callable[[Bitmap], object], known: int | None = None
                    ) -> InPlace | None:
    """OR a report of ``nbits`` bits into ``words`` at ``first_bit`` (a multiple of 64) by
    letting ``write`` overwrite ``words[first_bit // 64:][:words_for(nbits)]`` with it
    (type1 GET_BITMAP semantics, the last word's bits past ``nbits`` included), then
    restoring what those words held. ``known``: the caller knows every one of those words
    holds this value (0 or all ones), so they are not read first. Returns the counts, or
    None without calling ``write`` when what the words hold is too much to save."""
    fn = "report_in_place"
    words = check_words(fn, "words", words, writable=True)
    first = check_count(fn, "first_bit", first_bit)
    nbits = check_count(fn, "nbits", nbits, minimum=1)
    if first % 64:
        raise ValueError(f"{fn}: first_bit {first} is not a multiple of 64")
    w0, nw = first // 64, words_for(nbits)
    if w0 + nw > words.shape[0]:
        raise ValueError(f"{fn}: bits [{first}, {first + nbits}) do not fit in words "
                         f"({words.shape[0]} words)")
    seg = words[w0:w0 + nw]
    if known is None:
        nonzero, notall = _k_unlike(seg)
    elif known in (0, int(ALL)):
        nonzero, notall = (0, nw) if known == 0 else (nw, 0)
    else:
        raise ValueError(f"{fn}: known must be 0, all ones or None, got {known:#x}")
    room = max(SAVE_MIN_WORDS, nw // SAVE_FRACTION)
    if min(nonzero, notall) > room:
        return None
    fill, n = (ZERO, int(nonzero)) if nonzero <= notall else (ALL, int(notall))
    idx = np.empty(n, np.int64)
    val = np.empty(n, np.uint64)
    if n:
        _k_save(seg, fill, idx, val)
    try:
        write(seg)
    finally:                    # also after a failed report: the saved bits go back
        reported, added, full = _k_count_restore(seg, nbits, fill, idx, val)
    return InPlace(int(reported), int(added), bool(full))


def warm_up() -> None:
    """Compile or load the three kernels now, as a sync calls them (docs/architecture.md
    §4 fixed costs: a migration's first, timed sync must not pay it)."""
    words = np.zeros(2 * SAVE_MIN_WORDS, np.uint64)
    words[3] = 5                 # one word to save before the report and OR back after
    report_in_place(words, 0, 64 * SAVE_MIN_WORDS, lambda seg: seg.fill(0))
