"""``vfiod demo`` and ``vfiod devices`` as an operator runs them: real processes (the demo
starts a second vfiod process as the destination and migrates over loopback TCP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vfiod.cli.main import main

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
    assert len(s["history"]) == s["iterations"]


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
