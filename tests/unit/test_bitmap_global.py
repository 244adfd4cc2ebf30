"""GlobalBitmap (per-guest dirty bitmap) and DirtyRate, docs/architecture.md §3 and §4."""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest

from vfiod.dirty import bitmap_ref as R
from vfiod.dirty.global_bitmap import DirtyRate, GlobalBitmap
from vfiod.dirty.ranges import PageRange
from vfiod.dirty.tracker import DirtyTracker
from vfiod.vfio import RamRegion


def bitmap_of(pages: list[int], nbits: int) -> np.ndarray:
    w = np.zeros((nbits + 63) // 64, dtype=np.uint64)
    for p in pages:
        w[p // 64] |= np.uint64(1 << (p % 64))
    return w


def dirty_pages(g: GlobalBitmap) -> list[int]:
    first, count = g.runs(1 << 40)
    return [p for f, c in zip(first.tolist(), count.tolist(), strict=True)
            for p in range(f, f + c)]


def test_merge_at_unaligned_guest_pages() -> None:
    g = GlobalBitmap(1000)
    # two mappings whose bitmaps start at guest pages 100 and 163 (neither 64-aligned)
    assert g.merge_container(bitmap_of([0, 1, 62, 63], 63), 100, 63) == 63
    assert g.merge_container(bitmap_of([0, 64, 199], 200), 163, 200) == 200
    assert dirty_pages(g) == [100, 101, 162, 163, 227, 362]
    assert g.count() == 6 and g.dirty_bytes() == 6 * 4096


def test_merge_and_count_returns_the_pages_the_bitmap_reported() -> None:
    g = GlobalBitmap(1000)
    g.merge_container(bitmap_of([5], 64), 64, 64)
    # bits 0, 1 and 70 are in range (guest pages 100, 101, 170); bit 300 is past nbits
    assert g.merge_and_count(bitmap_of([0, 1, 70, 300], 301), 100, 300) == 3
    assert g.merge_and_count(bitmap_of([], 64), 0, 64) == 0
    assert g.merge_and_count(bitmap_of([5], 64), 64, 64) == 1   # reported again: counted
    assert dirty_pages(g) == [69, 100, 101, 170]
    with pytest.raises(ValueError, match="past the guest's 1000 pages"):
        g.merge_and_count(bitmap_of([0], 64), 990, 64)


def test_merge_ors_and_ignores_bits_past_nbits() -> None:
    g = GlobalBitmap(200)
    g.merge_container(bitmap_of([3], 10), 5, 10)
    g.merge_container(bitmap_of([3, 4, 9, 10, 63], 64), 5, 10)  # 10 and 63 are past nbits
    assert dirty_pages(g) == [8, 9, 14]


def test_merge_coarser_guest_pages() -> None:
    # IOMMU pages of 4 KiB, guest pages of 16 KiB: a guest page is dirty if any of its 4 is
    g = GlobalBitmap(100, page_size=16384)
    covered = g.merge_container(bitmap_of([0, 5, 6, 7, 41], 42), 10, 42, src_pgsize=4096)
    assert covered == 11  # ceil(42 / 4)
    assert dirty_pages(g) == [10, 11, 20]


def test_merge_finer_guest_pages() -> None:
    # IOMMU pages of 64 KiB over 4 KiB guest pages: each IOMMU page dirties 16 guest pages
    g = GlobalBitmap(200)
    assert g.merge_container(bitmap_of([1, 3], 4), 7, 4, src_pgsize=65536) == 64
    assert dirty_pages(g) == list(range(23, 39)) + list(range(55, 71))


def test_merge_past_the_guest_is_refused_and_nothing_changes() -> None:
    g = GlobalBitmap(128)
    g.mark_all(PageRange(0, 3))
    before = g.words.copy()
    with pytest.raises(ValueError, match=r"cover guest pages \[100, 164\), past the guest's 128"):
        g.merge_container(bitmap_of([0], 64), 100, 64)
    with pytest.raises(ValueError, match=r"64 pages of 65536 bytes at guest page 0 cover guest "
                                         r"pages \[0, 1024\)"):
        g.merge_container(bitmap_of([0], 64), 0, 64, src_pgsize=65536)
    with pytest.raises(ValueError, match="src_pgsize must be a power of two"):
        g.merge_container(bitmap_of([0], 64), 0, 64, src_pgsize=5000)
    with pytest.raises(ValueError, match=r"bits \[0, 65\) do not fit in bitmap"):
        g.merge_container(bitmap_of([0], 64), 0, 65)
    with pytest.raises(ValueError, match="first_guest_page must be >= 0"):
        g.merge_container(bitmap_of([0], 64), -1, 64)
    assert np.array_equal(g.words, before)


def test_mark_count_take_and_clear() -> None:
    g = GlobalBitmap(300)
    g.mark_all(PageRange(60, 10))
    g.mark_all(PageRange(299, 1))
    assert g.count() == 11
    taken = g.take_and_clear(PageRange(65, 100))
    assert taken.tolist() == [0b11111, 0]  # pages 65..69 as bits 0..4 of the taken range
    assert dirty_pages(g) == [60, 61, 62, 63, 64, 299]
    g.mark_all()
    assert g.count() == 300
    assert int(g.words[-1]) >> (300 % 64) == 0  # nothing past the guest's last page
    everything = g.take_and_clear()
    assert R.popcount(everything, 300) == 300 and g.count() == 0


def test_runs_are_split_at_max_run() -> None:
    g = GlobalBitmap(1000)
    g.mark_all(PageRange(10, 250))
    first, count = g.runs(100)
    assert first.tolist() == [10, 110, 210] and count.tolist() == [100, 100, 50]
    with pytest.raises(ValueError, match="max_run must be >= 1"):
        g.runs(0)


def test_take_runs_takes_every_run_and_clears() -> None:
    g = GlobalBitmap(1000)
    g.mark_all(PageRange(10, 250))
    g.mark_all(PageRange(999, 1))
    first, count = g.take_runs(100)
    assert first.tolist() == [10, 110, 210, 999] and count.tolist() == [100, 100, 50, 1]
    assert g.count() == 0


def test_taking_a_pass_does_not_copy_the_bitmap() -> None:
    # 2^24 pages (a 2 MiB bitmap), all dirty: the runs are read from the bitmap itself;
    # a copy of it for the pass was a bitmap's worth more memory while the pass was sent
    tr = DirtyTracker([RamRegion("ram", 0, (1 << 24) * 4096)], [])
    tr.start(initial_all_dirty=True)
    tr.take_dirty_runs(1 << 20)          # numba's first call, outside the measurement
    tr.bitmap.mark_all()
    tracemalloc.start()
    try:
        first, count = tr.take_dirty_runs(1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first.tolist() == [i << 20 for i in range(16)] and tr.bitmap.count() == 0
    assert peak < tr.bitmap.words.nbytes, peak


@pytest.mark.parametrize("seed", range(4))
def test_in_place_reports_keep_every_bit_and_the_count(seed: int) -> None:
    # merge_report skips reading words it knows clean (none given to a report since the
    # last take) and keeps count() without a pass; against a model of the bits, and the
    # popcount, after any mix of operations (the reports here write words over, as type1)
    rng = np.random.default_rng(seed)
    g = GlobalBitmap(64 * 300 - 5)
    model = np.zeros(300, np.uint64)

    def overwrite_with(report: np.ndarray):  # noqa: ANN202
        def write(words: np.ndarray) -> None:
            words[:] = report[:words.size]
        return write

    def or_in(first: int, nbits: int, bits: np.ndarray) -> None:
        for i in np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")[:nbits]):
            p = first + int(i)
            model[p // 64] |= np.uint64(1 << (p % 64))

    for step in range(80):
        first = 64 * int(rng.integers(0, 200))
        nbits = int(rng.integers(1, g.npages - first + 1))
        n = (nbits + 63) // 64
        kind = step % 6
        if kind in (0, 1, 2):
            report = rng.integers(0, 2**63, size=n, dtype=np.uint64) * (rng.random(n) < 0.3)
            report = report.astype(np.uint64)
            if nbits % 64:
                report[-1] &= np.uint64((1 << (nbits % 64)) - 1)
            if g.merge_report(overwrite_with(report), first, nbits) is not None:
                or_in(first, nbits, report)
            else:
                g.merge_and_count(report, first, nbits)
                or_in(first, nbits, report)
        elif kind == 3:
            g.mark_all(PageRange(first, nbits))
            or_in(first, nbits, np.full(n, np.uint64(2**64 - 1)))
        elif kind == 4:
            g.take_runs(64)
            model[:] = 0
        else:
            g.merge_and_count(np.ones(n, np.uint64), first, nbits)
            or_in(first, nbits, np.ones(n, np.uint64))
        assert g.words.tolist() == model.tolist(), step
        assert g.count() == R.popcount(g.words.copy(), g.npages), step


def test_words_known_clean_are_not_read_before_a_report(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import vfiod.dirty.report_in_place as rip
    scans: list[int] = []
    real = rip._k_unlike
    monkeypatch.setattr(rip, "_k_unlike", lambda seg: (scans.append(seg.size), real(seg))[1])
    g = GlobalBitmap(64 * 8)
    g.mark_all(PageRange(3, 10))
    g.take_runs(64)                              # all clear, and known to be

    def ones(words: np.ndarray) -> None:
        words[:] = np.uint64(2**64 - 1)
    assert g.merge_report(ones, 0, 128) == 128   # known clean: not read
    assert g.merge_report(ones, 256, 64) == 64   # another range: not read either
    assert scans == []
    assert g.merge_report(ones, 64, 128) == 128  # overlaps the first: read
    assert scans == [2]
    assert g.merge_report(ones, 0, 128) == 128   # left all ones by the first: not read
    assert scans == [2]
    assert g.count() == 256 + 64 - 64
    g.take_runs(64)
    assert g.merge_report(ones, 0, 128) == 128   # a take forgot the ones, and cleared
    assert scans == [2] and g.count() == 128


def test_ranges_past_the_guest_are_refused() -> None:
    g = GlobalBitmap(100)
    with pytest.raises(ValueError, match=r"mark_all: guest pages \[90, 101\) extend past"):
        g.mark_all(PageRange(90, 11))
    with pytest.raises(ValueError, match="take_and_clear: pages must be a PageRange"):
        g.take_and_clear((0, 10))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="PageRange: count must be >= 0"):
        PageRange(0, -1)
    assert g.count() == 0


def test_words_view_is_read_only() -> None:
    g = GlobalBitmap(64)
    with pytest.raises(ValueError):
        g.words[0] = 1
    g.clear()


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="GlobalBitmap: page_size must be a power of two"):
        GlobalBitmap(10, page_size=3000)
    with pytest.raises(ValueError, match="GlobalBitmap: npages must be >= 0"):
        GlobalBitmap(-1)


def test_concurrent_merges_lose_no_bits() -> None:
    # Neighbouring mappings share boundary words; merges from several threads must all land.
    g = GlobalBitmap(64 * 400)
    starts = [0, 6401, 12803, 19205]  # unaligned, each mapping 6400 pages, adjacent-ish
    rng = np.random.default_rng(7)
    maps = [rng.integers(0, 1 << 64, 100, dtype=np.uint64, endpoint=False) for _ in starts]
    barrier = threading.Barrier(len(starts))

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(50):
            g.merge_container(maps[i], starts[i], 6395)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(starts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = np.zeros_like(g.words)
    for s, m in zip(starts, maps, strict=True):
        R.or_merge(want, m, s, 6395)
    assert np.array_equal(g.words, want)


def test_dirty_rate_between_syncs() -> None:
    r = DirtyRate(4096, alpha=0.5)
    assert r.sample(100, 10.0) is None  # first sync: the baseline only
    assert r.last is None and r.smoothed is None
    assert r.sample(256, 10.5) == 256 * 4096 / 0.5
    assert r.sample(0, 11.5) == 0.0
    assert r.last == 0.0 and r.smoothed == pytest.approx(0.5 * 256 * 4096 / 0.5)


def test_dirty_rate_from_tracking_start() -> None:
    r = DirtyRate(2 << 20)
    r.start(100.0)
    assert r.sample(10, 102.0) == 10 * (2 << 20) / 2.0


def test_dirty_rate_refuses_bad_input() -> None:
    r = DirtyRate(4096)
    r.sample(1, 5.0)
    with pytest.raises(ValueError, match="timestamp 5.0 is not after the previous sync at 5.0"):
        r.sample(1, 5.0)
    with pytest.raises(ValueError, match="timestamp 4.0 is not after"):
        r.sample(1, 4.0)
    with pytest.raises(ValueError, match="dirty_pages must be >= 0"):
        r.sample(-1, 6.0)
    assert r.sample(1, 6.0) == 4096.0  # the refused samples changed nothing
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        DirtyRate(4096, alpha=0.0)
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        DirtyRate(1000)
