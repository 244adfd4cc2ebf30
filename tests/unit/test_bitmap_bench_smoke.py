"""The ``make bench`` harness runs and writes well-formed rows (tiny sizes, no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.bench import run as bench_run
from tests.bench.timing import BenchConfig, BenchSkip, row, schema_errors

ROOT = Path(__file__).resolve().parents[2]
MINE = ["merge_unaligned_1tib", "merge_unaligned_1tib_vs_copy", "runs_random_1pct", "runs_long",
        "popcount_1tib", "numba_first_call_cached"]


def harness(*args: str, size_log2: int = 12) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VFIOD_BENCH_SIZE_LOG2=str(size_log2))
    return subprocess.run([sys.executable, "-m", "tests.bench.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=280)


def test_harness_rows_and_results_file(tmp_path: Path) -> None:
    out = tmp_path / "new-dir" / "results.json"
    keys = [a for name in MINE for a in ("-k", name)]
    p = harness("--quick", "--reps", "1", "--out", str(out), *keys)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["name"] for r in lines] == MINE
    for r in lines:
        assert schema_errors(r) == [], r
        assert "2^12 bits" in r.get("note", "") or r["name"] == "numba_first_call_cached"
    assert json.loads(out.read_text()) == lines


def test_skips_failures_and_bad_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    def good() -> dict[str, Any]:
        return row("good", 1.0, "s", "b", 2.0, 2.0)

    def skipped() -> None:
        raise BenchSkip("needs a unicorn")

    def broken() -> None:
        raise RuntimeError("boom")

    def bad_row() -> dict[str, Any]:
        return {"name": "bad"}

    benches = [("good", good), ("skipped", skipped), ("broken", broken), ("bad_row", bad_row)]
    monkeypatch.setattr(bench_run, "discover", lambda: benches)
    out = tmp_path / "r.json"
    assert bench_run.main(["--no-kernels", "--out", str(out)]) == 1   # a failure, a bad row
    cap = capsys.readouterr()
    assert [json.loads(line)["name"] for line in cap.out.splitlines()] == ["good"]
    assert '{"name": "skipped", "skipped": "needs a unicorn"}' in cap.err
    assert "benchmark broken failed" in cap.err and "RuntimeError: boom" in cap.err
    assert "benchmark bad_row returned a bad row" in cap.err and "missing key 'unit'" in cap.err
    assert [r["name"] for r in json.loads(out.read_text())] == ["good"]
    monkeypatch.setattr(bench_run, "discover", lambda: benches[:2])
    assert bench_run.main(["--no-kernels", "--out", str(out)]) == 0  # a skip alone: 0


def test_harness_lists_every_module() -> None:
    p = harness("--list")
    assert p.returncode == 0, p.stderr
    names = p.stdout.split()
    assert set(MINE) <= set(names)
    assert {"sync_1tib_4containers", "stream_loopback"} <= set(names)  # other tasks' modules


def test_harness_refuses_unknown_names_and_bad_sizes(tmp_path: Path) -> None:
    p = harness("-k", "no-such-bench", "--out", str(tmp_path / "r.json"))
    assert p.returncode == 2 and "no benchmark matches -k no-such-bench" in p.stderr
    assert not (tmp_path / "r.json").exists()
    p = harness("--size-log2", "3")
    assert p.returncode == 2 and "--size-log2 must be in [8, 34], got 3" in p.stderr


def test_schema_check_catches_bad_rows() -> None:
    good = row("x", 1.0, "s", "base", 2.0, 2.0, note="n")
    assert schema_errors(good) == []
    assert schema_errors([good]) == ["result is a list, not a dict"]
    bad: dict[str, Any] = dict(good, ratio=float("nan"), unit="")
    del bad["baseline"]
    errs = schema_errors(bad)
    assert "missing key 'baseline'" in errs
    assert any("'ratio' must be a finite number" in e for e in errs)
    assert any("'unit' must be a non-empty str" in e for e in errs)
    assert schema_errors(dict(good, value=True)) != []


def test_call_passes_only_declared_parameters() -> None:
    seen: dict[str, Any] = {}

    def only_quick(quick: bool) -> dict[str, Any]:
        seen["quick"] = quick
        return row("q", 1, "s", "b", 1, 1)

    def nothing() -> list[dict[str, Any]]:
        return [row("a", 1, "s", "b", 1, 1), row("b", 1, "s", "b", 1, 1)]

    cfg = BenchConfig(size_log2=10, reps=1, quick=True)
    assert [r["name"] for r in bench_run._call(only_quick, cfg)] == ["q"]
    assert seen == {"quick": True}
    assert [r["name"] for r in bench_run._call(nothing, cfg)] == ["a", "b"]


@pytest.mark.parametrize("name", MINE)
def test_every_bitmap_bench_is_registered(name: str) -> None:
    assert name in [n for n, _ in bench_run.discover()]


def test_kernels_are_warmed_before_the_first_benchmark(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # as a host's unit runs `vfiod kernels` before its daemon: on a fresh clone numba's
    # cache holds nothing for this tree, and a benchmark's daemons would compile inside
    # the migrations they measure
    order: list[str] = []
    monkeypatch.setattr(bench_run, "warm_kernels", lambda: order.append("kernels") or True)
    monkeypatch.setattr(bench_run, "discover", lambda: [
        ("first", lambda: order.append("first") or row("first", 1.0, "s", "b", 1.0, 1.0))])
    assert bench_run.main(["--out", str(tmp_path / "r.json")]) == 0
    assert order == ["kernels", "first"]
    order.clear()
    assert bench_run.main(["--no-kernels", "--out", str(tmp_path / "r.json")]) == 0
    assert order == ["first"]


def test_warm_kernels_runs_vfiod_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_run.warm_kernels() is True
    assert capsys.readouterr().err.startswith("vfiod kernels: ")
