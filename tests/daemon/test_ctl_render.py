"""``vfiod ctl watch`` rendering: a redrawn progress bar with the predicted downtime on a
terminal, one plain line per change otherwise, the outcome and exit status at the end;
and the help text that documents exit codes with examples."""

from __future__ import annotations

import io
import json
import subprocess
from typing import Any

import pytest

from tests.support.daemons import child_env, vfiod_cmd
from vfiod.cli import ctl_cmd
from vfiod.cli.ctl_outcome import outcome_line
from vfiod.cli.exits import Exit
from vfiod.daemon.lifecycle import LifecycleState


def _guest(phase: str, iteration: int, remaining: int, predicted: float | None,
           result: str | None = None, throughput: float | None = 8e6) -> dict[str, Any]:
    return {"name": "g1", "state": "running", "migration": {
        "id": "abc", "role": "source", "peer": "10.0.0.2:4444", "result": result,
        "error": None, "downtime_s": 0.05 if result else None, "predicted_downtime_s": 0.06,
        "verified": True if result else None, "downtime_limit_ms": 300.0,
        "live": {"triple": "(RUNNING, ACTIVE, RUNNING|SAVING)"},
        "progress": {"phase": phase, "iteration": iteration, "ram_total_bytes": 100 << 20,
                     "ram_remaining_bytes": remaining, "device_remaining_bytes": 0,
                     "predicted_downtime_s": predicted, "will_converge": True,
                     "bytes_sent": (100 << 20) - remaining, "throughput_bps": throughput,
                     "eta_s": None if throughput is None else remaining / throughput}}}


class FakeClient:
    def __init__(self, answers: list[dict[str, Any]]) -> None:
        self.answers = answers

    def call(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        assert op == "status"
        return {"guests": [self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]]}


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _answers(final: str) -> list[dict[str, Any]]:
    return [_guest("precopy", 1, 80 << 20, 0.9), _guest("precopy", 2, 50 << 20, 0.45),
            _guest("stopcopy", 3, 50 << 20, 0.45), _guest("done", 3, 0, 0.06, final)]


def test_terminal_gets_a_redrawn_bar() -> None:
    out = Tty()
    code = ctl_cmd._follow(FakeClient(_answers("completed")), "g1", False, out, 0.001, "abc")  # type: ignore[arg-type]
    text = out.getvalue()
    assert code == Exit.OK
    assert text.count("\r\x1b[K") >= 3 and "\n" not in text.split("g1: completed")[0]
    assert "[##########----------]  50%" in text
    assert "sent   50.0 MiB  remaining   50.0 MiB at 8.0 MB/s eta 6.6 s" in text
    assert "predicted downtime 450 ms (limit 300 ms)" in text
    assert text.endswith("g1: completed to 10.0.0.2:4444 (downtime 50 ms, predicted 60 ms, "
                         "verified yes)\n")


def test_pipe_gets_plain_lines_and_failure_exit() -> None:
    out = io.StringIO()
    code = ctl_cmd._follow(FakeClient(_answers("cancelled")), "g1", False, out, 0.001, "abc")  # type: ignore[arg-type]
    lines = out.getvalue().splitlines()
    assert code == Exit.FAILED
    assert "\r" not in out.getvalue()
    assert len(lines) == 4 and lines[-1] == "g1: cancelled to 10.0.0.2:4444"
    assert "stopcopy" in lines[2]
    assert lines[-2] == ("g1 50% stopcopy iter 3 sent 50.0 MiB remaining 50.0 MiB at "
                         "8.0 MB/s eta 6.6 s predicted downtime 450 ms (limit 300 ms) "
                         "(RUNNING, ACTIVE, RUNNING|SAVING)")


def test_no_throughput_and_eta_before_the_link_was_measured() -> None:
    line = ctl_cmd._progress_line(_guest("precopy", 1, 80 << 20, None, throughput=None),
                                  bar=False)
    assert line == ("g1 20% precopy iter 1 sent 20.0 MiB remaining 80.0 MiB predicted "
                    "downtime - (limit 300 ms) (RUNNING, ACTIVE, RUNNING|SAVING)")


_SHARE = {"total_s": 0.021, "load_s": 0.002, "verify_s": 0.004, "resume_s": 0.001}


def test_the_destinations_outcome_gives_the_sources_report_and_its_own_share() -> None:
    m = _guest("done", 3, 0, 0.06, "completed")["migration"]
    m.update(role="destination", peer="10.0.0.1", prediction_error=0.2, downtime_share=_SHARE)
    assert outcome_line(m) == (
        "completed from 10.0.0.1 (downtime 50 ms, predicted 60 ms, error 20%; share here "
        "21.0 ms: load 2.0 ms, verify 4.0 ms, resume 1.0 ms; verified yes)")


def test_without_the_sources_report_the_destination_gives_its_share() -> None:
    m = _guest("done", 3, 0, 0.06, "completed")["migration"]
    m.update(role="destination", peer="10.0.0.1", downtime_s=None, downtime_share=_SHARE)
    assert outcome_line(m) == (
        "completed from 10.0.0.1 (downtime -, predicted 60 ms, error -; share here 21.0 ms: "
        "load 2.0 ms, verify 4.0 ms, resume 1.0 ms; verified yes)")


def test_nothing_to_watch_once() -> None:
    out = io.StringIO()
    idle = {"name": "g1", "state": "running", "migration": None}
    assert ctl_cmd._follow(FakeClient([idle]), None, False, out, 0.001, None) == 0  # type: ignore[arg-type]
    assert out.getvalue() == "no migration running\n"


def test_watch_waits_for_the_next_migration() -> None:
    out = io.StringIO()
    idle = {"name": "g1", "state": "running", "migration": None}
    client = FakeClient([idle, idle, *_answers("completed")])
    assert ctl_cmd._follow(client, None, False, out, 0.001, None, wait=True) == 0  # type: ignore[arg-type]
    lines = out.getvalue().splitlines()
    assert lines[0] == "waiting for a migration to start (Ctrl-C to stop)"
    assert lines[-1].startswith("g1: completed")


def test_plain_lines_draw_no_bar() -> None:
    out = io.StringIO()
    ctl_cmd._follow(FakeClient(_answers("completed")), "g1", False, out, 0.001, "abc")  # type: ignore[arg-type]
    first = out.getvalue().splitlines()[0]
    assert "[" not in first and "#" not in first, first
    assert first.startswith("g1 20% precopy iter 1 sent 20.0 MiB remaining 80.0 MiB at "
                            "8.0 MB/s eta 10.5 s predicted downtime 900 ms")


class CancellingClient(FakeClient):
    """Ctrl-C arrives while ``migrate`` follows; records what the client then asks."""

    def __init__(self) -> None:
        super().__init__([])
        self.ops: list[tuple[str, dict[str, Any] | None]] = []

    def reopen(self) -> CancellingClient:
        return self

    def __enter__(self) -> CancellingClient:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def call(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        self.ops.append((op, args))
        if op == "migrate":
            return {"migration": {"id": "abc"}}
        if op == "cancel":
            return {"guest": "g1", "migration": "abc"}
        raise KeyboardInterrupt


def _migrate_args(**kw: Any) -> Any:
    import argparse
    return argparse.Namespace(**{"guest": "g1", "to": "10.0.0.2:4444", "downtime_limit": None,
                                 "timeout": None, "on_timeout": None, "channels": None,
                                 "detach": False, "json": False, **kw})


def test_ctrl_c_without_a_terminal_cancels_and_says_so(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    c = CancellingClient()
    with pytest.raises(KeyboardInterrupt):
        ctl_cmd._migrate(c, _migrate_args(), io.StringIO())  # type: ignore[arg-type]
    assert ("cancel", {"guest": "g1"}) in c.ops
    assert "interrupted: cancelled migration abc of g1; the guest keeps running here" in \
        capsys.readouterr().err


@pytest.mark.parametrize("answer, cancels", [("y\n", True), ("n\n", False), ("", False)])
def test_ctrl_c_on_a_terminal_asks(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str], answer: str,
                                   cancels: bool) -> None:
    class TtyIn(io.StringIO):
        def isatty(self) -> bool:
            return True
    monkeypatch.setattr("sys.stdin", TtyIn(answer))
    c = CancellingClient()
    with pytest.raises(KeyboardInterrupt):
        ctl_cmd._migrate(c, _migrate_args(), io.StringIO())  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "cancel migration abc of g1? [y/N]" in err
    assert (("cancel", {"guest": "g1"}) in c.ops) is cancels
    if not cancels:
        assert "the migration keeps running: vfiod ctl watch g1 to follow it, vfiod ctl " \
               "cancel g1 to cancel it" in err


def test_detach_says_how_to_watch_and_cancel() -> None:
    out = io.StringIO()
    assert ctl_cmd._migrate(CancellingClient(), _migrate_args(detach=True), out) == 0  # type: ignore[arg-type]
    assert out.getvalue() == ("migration abc of g1 to 10.0.0.2:4444 started; follow it with: "
                              "vfiod ctl watch g1; cancel it with: vfiod ctl cancel g1\n")


def test_help_explains_every_guest_state() -> None:
    section = ctl_cmd.EPILOG.split("guest states (vfiod ctl status):\n")[1].split("\n\n")[0]
    named = {name for line in section.splitlines() if not line.startswith("    ")
             for name in line.strip().split("  ")[0].split(", ")}
    assert named == {s.value for s in LifecycleState}


@pytest.mark.parametrize("argv, needles", [
    (["ctl", "--help"], ["exit status:", "vfiod ctl migrate g1 --to 10.0.0.2:4444",
                         "permission denied", "--json"]),
    (["run", "--help"], ["--backend {linux,sim}", "SIGHUP reloads", "exit status:"]),
])
def test_help_teaches(argv: list[str], needles: list[str]) -> None:
    r = subprocess.run(vfiod_cmd(*argv), capture_output=True, text=True, env=child_env(),
                       timeout=120)
    assert r.returncode == 0
    for n in needles:
        assert n in r.stdout, n


def test_watch_json_prints_json_lines() -> None:
    out = Tty()                      # even on a terminal: no bar, no escapes
    code = ctl_cmd._follow(FakeClient(_answers("completed")), "g1", True, out, 0.001, "abc")  # type: ignore[arg-type]
    lines = out.getvalue().splitlines()
    assert code == Exit.OK and len(lines) == 4
    objs = [json.loads(line) for line in lines]
    assert [o["migration"]["progress"]["iteration"] for o in objs] == [1, 2, 3, 3]
    assert objs[-1]["migration"]["result"] == "completed"
