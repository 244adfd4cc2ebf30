"""``bench_sync`` runs end to end at a tiny size and returns well-formed rows (no timing
asserts: speed is judged by ``make bench``, docs/testing.md)."""

from __future__ import annotations

from tests.bench import bench_sync
from tests.bench.timing import schema_errors


def test_sync_bench_rows_at_a_tiny_size() -> None:
    rows = bench_sync.run(size_log2=12, reps=1)
    assert [r["name"] for r in rows] == ["sync_1tib_4containers", "sync_1tib_4containers_sparse"]
    for r in rows:
        assert schema_errors(r) == [], r
        assert r["unit"] == "ms" and "2^12 bits" in r["note"]
    assert rows[0]["dirty_pages_per_sync"] == 1 << 12        # all-dirty scope: every page
    assert 0 < rows[1]["dirty_pages_per_sync"] <= 1 << 12
    assert [n for n, _ in bench_sync.benchmarks()] == ["sync_1tib_4containers"]


def test_sync_scaling_rows_at_a_tiny_size() -> None:
    from tests.bench import bench_sync_scaling as s
    rows = [s.sparse_vs_dense(size_log2=12, reps=1, quick=True),
            s.ram_curve(size_log2=12, reps=1, quick=True),
            s.fraction_curve(size_log2=12, reps=1)]
    assert [r["name"] for r in rows] == [n for n, _ in s.benchmarks()]
    for r in rows:
        assert schema_errors(r) == [], r
    assert rows[0]["dirty_pages_per_sync"] == 4 * 1024       # 4096 pages asked, 1024 exist
    assert list(rows[1]["curve_ms"]) == ["16 MiB"]                # 2^12 pages of 4 KiB
    assert list(rows[2]["curve_ms"]) == [str(f) for f in s.FRACTIONS]
    assert all(r["vfiod_ms"] >= 0 for r in bench_sync.run(size_log2=12, reps=1))


def test_fraction_writes_dirty_the_asked_share() -> None:
    # The set-up behind the dirty-fraction curve marks what it says (checked by a sync).
    from tests.bench import bench_sync_scaling as s
    for fraction, want in ((0.0, 0), (1 / 16, 4 * 64), (1.0, 4 * 1024)):
        _, _, pages = bench_sync.timed_syncs(12, 1, mdev=True,
                                             make_dirty=s.fraction_writes(12, fraction))
        assert pages == want, fraction
