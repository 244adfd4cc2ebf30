"""``vfiod demo`` and ``vfiod devices`` as an operator runs them. The demo assembles the
product itself: two real ``vfiod run --backend sim`` processes from configuration files,
``vfiod ctl migrate`` between them, both daemons' /metrics scraped meanwhile; these tests
watch its processes from outside (their command lines while they run, gone afterwards)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.daemons import child_env, vfiod_cmd
from vfiod.cli.demo_metrics import pick
from vfiod.cli.demo_procs import DemoStepError, shown, vfiod_argv
from vfiod.cli.demo_procs import child_env as demo_child_env
from vfiod.cli.demo_report import (
    SAMPLES_KEPT,
    SUMMARY_LINES,
    DemoOutcome,
    DemoPrinter,
    summary_lines,
    summary_of,
)
from vfiod.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
SMALL = ("--ram-gib", "0.5", "--fill-mib", "64", "--dirty-mbps", "8")


def vfiod(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(vfiod_cmd(*args), cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=timeout)


def gone(pid: int) -> bool:
    """True once ``pid`` is no process (or a zombie nobody reaped: it runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_demo_json_migrates_through_two_daemons_and_ctl() -> None:
    p = vfiod("demo", "--json")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stdout[-2000:]          # --json: one object, nothing else
    assert len(p.stdout.encode()) < 32 * 1024         # bounded
    s = json.loads(lines[0])
    assert s["ok"] is True and s["step"] is None and s["reason"] is None
    assert s["result"] == "completed" and s["verified"] is True
    assert s["iterations"] >= 1
    assert s["predicted_downtime_s"] > 0 and s["actual_downtime_s"] > 0
    assert s["destination_share"]["total_s"] <= s["actual_downtime_s"]
    # a sparse 4 GiB guest: the never-written pages are not sent
    b = s["bytes"]
    assert b["guest_ram"] == 4 << 30 and 64 << 20 < b["sent"] < 1 << 30 and b["received"] > 0
    # two daemon processes, each with its own ports, stopped by SIGTERM and gone
    src, dst = s["daemons"]["source"], s["daemons"]["destination"]
    assert len({src["pid"], dst["pid"], os.getpid()}) == 3
    assert len({src["metrics"], dst["metrics"], src["migration_listen"],
                dst["migration_listen"]}) == 4
    for d in (src, dst):
        assert d["stop"] == "stopped by SIGTERM, exit status 0", d
        assert gone(d["pid"]), d
    assert [c.split(" --config ")[0] for c in s["commands"]["daemons"]] == [
        "vfiod run --backend sim"] * 2
    # the migration went through vfiod ctl, to the destination's migration port
    assert s["commands"]["migrate"].startswith(
        f"vfiod ctl --socket {src['control_socket']} migrate vm1 --to "
        f"{dst['migration_listen']} ")
    assert s["commands"]["migrate_exit"] == 0
    # where the guest is now, per vfiod ctl status
    assert s["guest_now"] == {"source": "incoming", "destination": "running",
                              "runs_on": "destination"}
    # both /metrics scraped while the migration ran, and once after it
    m = s["metrics"]
    assert m["during_migration"] >= 2 and m["scrapes"] >= m["during_migration"] + 1
    assert 2 <= len(m["samples"]) <= SAMPLES_KEPT
    assert all(x["source"]["active"] == 1 for x in m["samples"])
    assert [x["t_s"] for x in m["samples"]] == sorted(x["t_s"] for x in m["samples"])
    after = m["after"]
    assert (after["source"]["running"], after["destination"]["running"]) == (0, 1)
    assert after["source"]["predicted_downtime_s"] == pytest.approx(
        s["predicted_downtime_s"])
    assert s["workdir_removed"] is True and not Path(s["workdir"]).exists()


def test_demo_terminal_output_shows_the_processes_it_runs() -> None:
    """While the demo runs, the pids it names are ``vfiod run --backend sim`` processes
    with the configuration it wrote; afterwards they are gone, and the summary has its
    fixed length."""
    proc = subprocess.Popen(vfiod_cmd("demo", *SMALL), cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen: dict[str, list[str]] = {}
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            ready = re.match(r"  (source|destination) daemon pid (\d+) ready", line)
            if ready:
                seen[ready[1]] = psutil.Process(int(ready[2])).cmdline()
        err = proc.stderr.read() if proc.stderr else ""
        assert proc.wait(timeout=300) == 0, "\n".join(lines) + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "\n".join(lines)
    for role in ("source", "destination"):
        argv = seen[role]
        assert argv[argv.index("vfiod.cli.main") + 1:][:3] == ["run", "--backend", "sim"]
        assert argv[argv.index("--config") + 1].endswith(f"/{role}/vfiod.toml"), argv
    assert "$ vfiod ctl --socket " in out and " migrate vm1 --to 127.0.0.1:" in out
    summary = lines[lines.index("summary:"):]
    assert len(summary) == SUMMARY_LINES, summary
    pids = re.findall(r"(source|destination) pid (\d+)", summary[2])
    assert [r for r, _ in pids] == ["source", "destination"]
    assert all(gone(int(pid)) for _, pid in pids)
    for text in ("result        completed", "downtime      predicted", "verification  "
                 "the destination checked the RAM content digests: verified",
                 "guest now     vm1 runs on the destination (vfiod ctl status: source "
                 "incoming, destination running)", "during the migration:",
                 "stopped       source stopped by SIGTERM, exit status 0; destination "
                 "stopped by SIGTERM, exit status 0"):
        assert text in out, out


def test_demo_port_in_use_fails_naming_the_step_and_leaves_nothing() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = vfiod("demo", "--json", *SMALL, "--migration-port", str(port))
        h = vfiod("demo", *SMALL, "--migration-port", str(port))
    assert p.returncode == 1, p.stdout + p.stderr
    s = json.loads(p.stdout)
    assert (s["ok"], s["step"], s["result"]) == (False, "start the destination daemon", "error")
    assert f"127.0.0.1:{port}" in s["reason"] and "EADDRINUSE" in s["reason"], s["reason"]
    assert s["daemons"]["source"]["stop"] == "stopped by SIGTERM, exit status 0"
    assert s["daemons"]["destination"]["stop"] == "had exited with status 1"
    assert all(gone(d["pid"]) for d in s["daemons"].values())
    assert s["workdir_removed"] and not Path(s["workdir"]).exists()
    assert s["commands"]["migrate"] is None
    # for people: the step and the daemon's own error on stderr, the summary on stdout
    assert h.returncode == 1
    assert h.stderr.startswith("vfiod demo: step 'start the destination daemon' failed: "
                               "vfiod run exited with status 1 before it was ready: "), h.stderr
    assert "EADDRINUSE" in h.stderr.splitlines()[0]
    assert "result        error, FAILED at step 'start the destination daemon'" in h.stdout


def test_demo_cancelled_migration_fails_and_the_guest_stays() -> None:
    """A limit nothing meets and --on-timeout cancel: ctl migrate exits 1, the demo names
    that step, and ctl status shows the guest still running on the source."""
    p = vfiod("demo", "--json", *SMALL, "--downtime-limit-ms", "0.001", "--timeout", "1",
              "--on-timeout", "cancel")
    assert p.returncode == 1, p.stdout + p.stderr
    s = json.loads(p.stdout)
    assert (s["ok"], s["step"], s["result"]) == (False, "vfiod ctl migrate", "cancelled")
    assert s["reason"].startswith("the migration ended cancelled: cancelled by policy"), s
    assert s["commands"]["migrate_exit"] == 1
    assert s["guest_now"] == {"source": "running", "destination": "incoming",
                              "runs_on": "source"}
    assert all(gone(d["pid"]) for d in s["daemons"].values())
    assert not Path(s["workdir"]).exists()


def _record(t: int, phase: str = "precopy", result: str | None = None) -> dict[str, Any]:
    return {"result": result, "downtime_s": None, "predicted_downtime_s": 0.5,
            "verified": None, "error": None,
            "progress": {"phase": phase, "iteration": t, "bytes_sent": 0,
                         "ram_remaining_bytes": 0, "predicted_downtime_s": 0.5,
                         "triple": ""}}


def test_progress_lines_are_rate_limited(capsys: pytest.CaptureFixture[str]) -> None:
    """1000 records of ``ctl migrate --json`` 10 ms apart: a line per second at most, and
    always a new phase and the outcome."""
    out = DemoPrinter(False)
    for i in range(1000):
        out.progress(_record(i), i / 100)
    out.progress(_record(1000, "stopcopy"), 10.001)
    out.progress(_record(1000, "done", "completed"), 10.002)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 12, lines
    assert lines[0].startswith("  t=0.0 s  precopy  pass   0")
    assert lines[1].startswith("  t=1.0 s  precopy  pass 100")
    assert lines[-2].startswith("  t=10.0 s  stopcopy pass 1000")
    assert lines[-1].startswith("  t=10.0 s  completed:")
    assert out.hidden == 1000 - 10
    quiet = DemoPrinter(True)
    quiet.progress(_record(1), 0.0)
    assert capsys.readouterr().out == ""


def test_summary_has_its_length_when_nothing_ran() -> None:
    args = build_parser().parse_args(["demo"])
    outcome = DemoOutcome(t0=0.0, failed=DemoStepError("write the configurations", "disk full"))
    s = summary_of(outcome, args)
    assert (s["ok"], s["step"], s["reason"]) == (False, "write the configurations", "disk full")
    lines = summary_lines(s)
    assert len(lines) == SUMMARY_LINES
    assert "  guest now     - (not asked)" in lines


def test_pick_spreads_evenly() -> None:
    xs = list(range(10))
    assert pick(xs, 3) == [0, 4, 9]
    assert pick(xs, 20) == xs and pick(xs, 1) == [9] and pick([], 3) == []


@pytest.mark.parametrize("args,message", [
    (["demo", "--ram-gib", "0.01"], "too small"),
    (["demo", "--ram-gib", "0.5", "--fill-mib", "4096"], "does not fit"),
    (["demo", "--migration-port", "70000"], "is not a TCP port"),
])
def test_demo_bad_arguments(args: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(args)


def test_demo_help_teaches_the_steps() -> None:
    p = vfiod("demo", "--help", timeout=60)
    assert p.returncode == 0
    for text in ("vfiod run --backend sim", "vfiod ctl migrate vm1 --to 127.0.0.1:PORT",
                 "/metrics", "vfiod ctl status", "SIGTERM", "--json", "exit status",
                 "--migration-port"):
        assert text in p.stdout, text


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



def test_the_demos_processes_run_its_own_code_whatever_directory_it_runs_in(
        tmp_path: Path) -> None:
    """An operator may run ``vfiod demo`` from a directory that holds another ``vfiod/``
    (a checkout of another version): ``python -m`` would import that one first, and the
    demo's daemons and ``ctl`` would not be the code that printed the demo."""
    shadow = tmp_path / "vfiod"
    shadow.mkdir()
    (shadow / "__init__.py").write_text('raise ImportError("the shadowing vfiod/ ran")\n')
    p = subprocess.run(vfiod_argv("--version"), cwd=tmp_path, env=demo_child_env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("vfiod "), p.stdout + p.stderr
    assert shown(vfiod_argv("ctl", "status")) == "vfiod ctl status"
