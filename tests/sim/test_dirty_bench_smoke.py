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
