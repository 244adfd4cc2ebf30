"""``vfiod demo`` and ``vfiod devices`` as an operator runs them: real processes (the demo
starts a second vfiod process as the destination and migrates over loopback TCP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vfiod.cli.demo_run import HISTORY_KEPT, _Printer
from vfiod.cli.main import main
from vfiod.migration.session.status import IterationProgress

ROOT = Path(__file__).resolve().parents[2]


def vfiod(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba"))
    return subprocess.run([sys.executable, "-m", "vfiod.cli.main", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_json_migrates_and_verifies() -> None:
    p = vfiod("demo", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stdout[-2000:]          # --json: one object, nothing else
    s = json.loads(lines[0])
    for key in ("result", "iterations", "predicted_downtime_s", "actual_downtime_s",
                "verified"):
        assert key in s
    assert s["result"] == "completed" and s["verified"] is True
    assert s["iterations"] >= 1
    assert s["predicted_downtime_s"] > 0 and s["actual_downtime_s"] > 0
    assert s["guest"]["ram_bytes"] == 4 << 30
    v = s["verification"]
    assert v["destination_verified"] and v["manifest"]["verified"]
    assert v["content_digests_match"] is True
    assert [r["name"] for r in v["regions"]] == ["ram", "dma-pool"]
    assert s["audit"] == {**s["audit"], "ram_equal": True, "device_models_equal": True}
    # a sparse 4 GiB guest: the never-written pages are not sent
    assert s["bytes"]["ram"] < 1 << 30 and s["bytes"]["zero_pages_skipped"] > 500_000
    assert s["workload"]["writes"] > 0 and s["workload"]["error"] is None
    assert len(s["history"]) == min(s["iterations"], HISTORY_KEPT)
    assert s["history_omitted"] == s["iterations"] - len(s["history"])


def test_demo_json_stays_small_however_many_passes_run() -> None:
    """200 passes (a limit nothing meets, nothing dirtied: every pass idles 50 ms), then
    the iteration cap forces: one JSON object under 64 KiB, the last passes kept."""
    p = vfiod("demo", "--json", "--ram-gib", "0.5", "--fill-mib", "16", "--dirty-mbps", "0",
              "--downtime-limit-ms", "0.001", "--max-iterations", "200")
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(p.stdout.encode()) < 64 * 1024
    s = json.loads(p.stdout)
    assert s["iterations"] == 200 and s["forced"] is True
    assert len(s["history"]) == HISTORY_KEPT and s["history_omitted"] == 200 - HISTORY_KEPT
    assert s["history"][-1]["iteration"] == 200


def _pass(i: int, decision: str = "continue") -> IterationProgress:
    return IterationProgress(
        iteration=i, elapsed_s=i * 0.01, ram_sent_bytes=0, device_sent_bytes=0,
        total_sent_bytes=0, remaining_bytes=0, dirty_ram_bytes=0, device_bytes=0,
        dirty_rate_bps=None, bandwidth_bps=1e9, bandwidth_source="test",
        predicted_downtime_s=0.5, will_converge=True, decision=decision, reason="r",
        sync_s=0.0)


def test_progress_lines_are_rate_limited(capsys: pytest.CaptureFixture[str]) -> None:
    """1000 passes, one clock tick apart by the injected clock, a line per 100 ticks at
    most, plus the deciding pass, each saying how many passes it stands for."""
    t = {"now": 0.0}
    out = _Printer(False, every_s=100.0, clock=lambda: t["now"])
    for i in range(1, 1001):
        t["now"] = float(i)
        out.progress(_pass(i, "force" if i == 1000 else "continue"))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 11, lines
    assert lines[0].startswith("iter   1") and "not shown" not in lines[0]
    assert lines[1].startswith("iter 101") and lines[1].endswith("(+99 passes not shown)")
    assert lines[-2].startswith("iter 901")
    assert lines[-1].startswith("iter 1000") and lines[-1].endswith("(+98 passes not shown)")
    quiet = _Printer(True, clock=lambda: 0.0)
    quiet.progress(_pass(1))
    assert capsys.readouterr().out == ""


def test_demo_terminal_output_small_guest() -> None:
    p = vfiod("demo", "--ram-gib", "0.5", "--fill-mib", "64", "--dirty-mbps", "8")
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "0.5 GiB RAM" in out and "64 MiB filled" in out
    assert "iter   1" in out and "predicted downtime" in out
    assert "(RUNNING, ACTIVE, RUNNING|SAVING/RUNNING)" in out
    for word in ("result        completed", "downtime      predicted", "destination   manifest "
                 "verified", "audit         full RAM digest equal", "verified      true"):
        assert word in out, out


@pytest.mark.parametrize("args,message", [
    (["demo", "--ram-gib", "0.01"], "too small"),
    (["demo", "--ram-gib", "0.5", "--fill-mib", "4096"], "does not fit"),
])
def test_demo_bad_arguments(args: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(args)


def test_devices_sim_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--sim", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    ours = {r["name"]: r for r in rows}
    assert ours["0000:3f:00.1"]["ours"] is True
    assert ours["0000:00:1f.6"]["ours"] is False
    assert "not ours" in ours["0000:00:1f.6"]["reason"]
    assert "not viable" in ours["0000:5e:00.1"]["reason"]
    assert any(r["kind"] == "mdev" and r["ours"] for r in rows)


def test_devices_on_an_empty_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--sysfs-root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "no PCI or mdev devices found"
    assert main(["devices", "--sysfs-root", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
