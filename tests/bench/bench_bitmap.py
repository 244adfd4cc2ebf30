"""Dirty-bitmap kernels against their numpy reference and against memory bandwidth.

Sizes: 2^size_log2 bits (default 2^28: one bit per 4 KiB page of 1 TiB of guest memory,
32 MiB of words). The names keep "1tib" at any size; ``note`` gives the real size. Both
sides are measured at full size in this run (best of ``reps``; the reference gets at most
3 repetitions because it is slow), no extrapolation.

* merge_unaligned_1tib: ``or_merge`` at bit offset 64*k+37; speedup over
  ``bitmap_ref.or_merge``. Target >= 10.
* merge_unaligned_1tib_vs_copy: the same merge as bandwidth (src bytes / time) against a
  numpy copy of the same bytes. Target >= 0.5.
* runs_random_1pct: ``dirty_runs`` where 1% of the words (random) hold random bits.
  Target >= 50 over the reference.
* runs_long: ``dirty_runs`` on runs and gaps of 1..100000 pages. Target >= 50.
* popcount_1tib: ``popcount`` over the reference (``np.bitwise_count``; no target).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from tests.bench.timing import BenchConfig, best_time, row
from vfiod.dirty import bitmap_kernels as K
from vfiod.dirty import bitmap_ref as R

MAX_RUN = 1024  # pages per run piece (4 MiB of 4 KiB pages), as a RAM sender would use
REF_REPS = 3
GIB = float(1 << 30)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:g} {unit}"
        n /= 1024
    return f"{n:g} TiB"


def _size_note(cfg: BenchConfig) -> str:
    nbits = 1 << cfg.size_log2
    return (f"2^{cfg.size_log2} bits = {_bytes(nbits * 4096)} of 4 KiB pages, "
            f"{_bytes(nbits // 8)} of bitmap; best of {cfg.reps} "
            f"(reference: best of {min(cfg.reps, REF_REPS)}), both at full size")


def _rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


@functools.cache
def _merge_times(cfg: BenchConfig) -> tuple[float, float, float, int]:
    """(kernel, reference, numpy copy) seconds for one unaligned merge; and the bytes."""
    nbits = 1 << cfg.size_log2
    nw = nbits // 64
    src = _rng().integers(0, 1 << 64, nw, dtype=np.uint64, endpoint=False)
    dst = np.zeros(nw + 2, dtype=np.uint64)
    off = 64 + 37
    copy_dst = np.empty_like(src)
    K.or_merge(dst, src, off, nbits)  # compile / load from cache outside the clock
    k = best_time(lambda: K.or_merge(dst, src, off, nbits), cfg.reps)
    c = best_time(lambda: np.copyto(copy_dst, src), cfg.reps)
    r = best_time(lambda: R.or_merge(dst, src, off, nbits), min(cfg.reps, REF_REPS))
    return k, r, c, src.nbytes


def merge_unaligned_1tib(cfg: BenchConfig) -> dict[str, Any]:
    k, r, _, _ = _merge_times(cfg)
    return row("merge_unaligned_1tib", k, "s", "bitmap_ref.or_merge (unpackbits/packbits)", r,
               r / k, target_ratio=10, note="ratio = reference time / kernel time; "
               + _size_note(cfg))


def merge_unaligned_1tib_vs_copy(cfg: BenchConfig) -> dict[str, Any]:
    k, _, c, nbytes = _merge_times(cfg)
    return row("merge_unaligned_1tib_vs_copy", nbytes / k / GIB, "GiB/s",
               "np.copyto of the same bytes (GiB/s)", nbytes / c / GIB, c / k, target_ratio=0.5,
               note="ratio = merge bandwidth / copy bandwidth over the src bytes; "
               + _size_note(cfg))


def _runs_row(name: str, words: np.ndarray, cfg: BenchConfig) -> dict[str, Any]:
    nbits = 1 << cfg.size_log2
    got = K.dirty_runs(words, nbits, MAX_RUN)
    want = R.dirty_runs(words, nbits, MAX_RUN)
    if not (np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])):
        raise AssertionError(f"{name}: kernel and reference disagree")
    k = best_time(lambda: K.dirty_runs(words, nbits, MAX_RUN), cfg.reps)
    r = best_time(lambda: R.dirty_runs(words, nbits, MAX_RUN), min(cfg.reps, REF_REPS))
    return row(name, k, "s", "bitmap_ref.dirty_runs (unpackbits + np.diff)", r, r / k,
               target_ratio=50, runs=int(got[0].shape[0]), max_run=MAX_RUN,
               note="ratio = reference time / kernel time; " + _size_note(cfg))


def runs_random_1pct(cfg: BenchConfig) -> dict[str, Any]:
    nw = (1 << cfg.size_log2) // 64
    rng = _rng()
    words = np.zeros(nw, dtype=np.uint64)
    hit = rng.choice(nw, max(1, nw // 100), replace=False)
    words[hit] = rng.integers(0, 1 << 64, hit.shape[0], dtype=np.uint64, endpoint=False)
    return _runs_row("runs_random_1pct", words, cfg)


def runs_long(cfg: BenchConfig) -> dict[str, Any]:
    nbits = 1 << cfg.size_log2
    rng = _rng()
    # alternating gap/run lengths of 1..100000 pages until the bitmap is covered
    lengths = rng.integers(1, 100_001, 2 * (nbits // 50_000 + 2))
    bits = np.repeat(np.arange(lengths.shape[0]) % 2, lengths)[:nbits].astype(np.uint8)
    bits = np.pad(bits, (0, nbits - bits.shape[0]))
    words = np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64)
    return _runs_row("runs_long", words, cfg)


def popcount_1tib(cfg: BenchConfig) -> dict[str, Any]:
    nbits = 1 << cfg.size_log2
    words = _rng().integers(0, 1 << 64, nbits // 64, dtype=np.uint64, endpoint=False)
    if K.popcount(words) != R.popcount(words):
        raise AssertionError("popcount: kernel and reference disagree")
    k = best_time(lambda: K.popcount(words), cfg.reps)
    r = best_time(lambda: R.popcount(words), min(cfg.reps, REF_REPS))
    return row("popcount_1tib", k, "s", "bitmap_ref.popcount (np.bitwise_count)", r, r / k,
               note="ratio = reference time / kernel time; no target (numpy's own popcount "
               "is already vectorised); " + _size_note(cfg))


def benchmarks() -> list[tuple[str, Callable[..., Any]]]:
    def bind(fn: Callable[[BenchConfig], Any]) -> Callable[..., Any]:
        def call(size_log2: int, reps: int, quick: bool) -> Any:
            return fn(BenchConfig(size_log2=size_log2, reps=reps, quick=quick))
        return call
    return [(fn.__name__, bind(fn)) for fn in (merge_unaligned_1tib, merge_unaligned_1tib_vs_copy,
                                               runs_random_1pct, runs_long, popcount_1tib)]
