"""``vfiod ctl`` exit codes and errors against a scripted daemon: one test per code of the
one exit-code table (``vfiod.cli.exits``), the table the same in ``--help`` and the README,
every error one JSON object on stdout with ``--json``, usage errors caught before the
daemon is asked, a readable resolver error, no traceback when the reader of stdout
leaves, and an example in every subcommand's ``--help``."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemons import REPO, child_env, vfiod_cmd
from vfiod.api import ApiErrorCode
from vfiod.cli import ctl_cmd, exits
from vfiod.cli.exits import API_EXIT, Exit
from vfiod.cli.main import build_parser, main

NOBODY = 65534
Answer = Callable[[str, dict[str, Any]], dict[str, Any]]


class ScriptedDaemon:
    """A control socket answering each request with ``answer(op, args)``: either
    ``{"result": ...}`` or ``{"error": {"code": ..., "message": ...}}``."""

    def __init__(self, answer: Answer) -> None:
        self.dir = tempfile.mkdtemp(prefix="vfiod-ctl-")
        os.chmod(self.dir, 0o755)             # the denial test's uid must traverse it
        self.path = os.path.join(self.dir, "control.sock")
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    req = json.loads(line)
                    outer.requests.append(req)
                    body = answer(req["op"], req.get("args") or {})
                    resp = {"schema": 1, "id": req["id"], "ok": "result" in body, **body}
                    self.wfile.write(json.dumps(resp).encode() + b"\n")

        self.server = socketserver.ThreadingUnixStreamServer(self.path, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.dir, ignore_errors=True)


STATUS = {"daemon": {"version": "0", "backend": "sim", "pid": 1, "uptime_s": 1.0,
                     "control_socket": "x", "metrics": None, "migration_listen": None,
                     "reload_error": None, "restart_needed": []},
          "guests": [{"name": f"g{i}", "state": "running", "ram_bytes": 1 << 30, "error": None,
                      "devices": [], "migration": None} for i in range(2000)]}


def _answer(op: str, args: dict[str, Any]) -> dict[str, Any]:
    if op == "status":
        return {"result": STATUS}
    if op == "check":
        return {"result": {"target": args["target"], "kind": "device", "migratable": False,
                           "blockers": ["ENOTTY and no v1 migration region"], "notes": []}}
    return {"error": {"code": "failed", "message": "scripted failure"}}


@pytest.fixture
def daemon() -> Iterator[ScriptedDaemon]:
    d = ScriptedDaemon(_answer)
    try:
        yield d
    finally:
        d.close()


def ctl(d: ScriptedDaemon | str, *args: str, capsys: pytest.CaptureFixture[str]
        ) -> tuple[int, str, str]:
    path = d if isinstance(d, str) else d.path
    code = main(["ctl", "--socket", path, *args])
    out, err = capsys.readouterr()
    return code, out, err


def _json_error(out: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    obj = json.loads(lines[0])
    assert set(obj) == {"code", "message", "details"}, obj
    return dict(obj)


# -- the one table -------------------------------------------------------------------------
def test_every_exit_status_is_in_the_table_once() -> None:
    assert [code for code, _ in exits.EXIT_TABLE] == sorted(Exit)
    assert set(API_EXIT) == set(ApiErrorCode)          # every daemon answer has its status


def test_help_and_readme_carry_the_table() -> None:
    table = exits.table_text()
    assert table in ctl_cmd.EPILOG
    ctl_help = build_parser()._subparsers._group_actions[0].choices["ctl"].format_help()  # type: ignore[union-attr]
    assert table in ctl_help
    readme = (REPO / "README.md").read_text()
    for code, text in exits.EXIT_TABLE:
        assert f"| {code.value} | {text} |" in readme, code


# -- a test per code -----------------------------------------------------------------------
def test_0_success(daemon: ScriptedDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ctl(daemon, "status", capsys=capsys)
    assert code == Exit.OK and "guest g0: running" in out


def test_1_check_says_cannot_migrate(daemon: ScriptedDaemon,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ctl(daemon, "check", "0000:5f:00.0", capsys=capsys)
    assert code == Exit.FAILED and "cannot migrate" in out


@pytest.mark.parametrize("api_code", list(ApiErrorCode))
def test_daemon_errors_map_to_the_table(api_code: ApiErrorCode,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    d = ScriptedDaemon(lambda op, args: {"error": {"code": api_code.value,
                                                   "message": "scripted"}})
    try:
        code, out, err = ctl(d, "cancel", "g1", capsys=capsys)
        assert code == API_EXIT[api_code] and out == ""
        assert err == "vfiod ctl cancel: scripted\n"
        code, out, err = ctl(d, "cancel", "g1", "--json", capsys=capsys)
    finally:
        d.close()
    assert code == API_EXIT[api_code] and err == ""
    obj = _json_error(out)
    assert obj["code"] == api_code.value and obj["message"] == "scripted"
    assert obj["details"] == {"command": "vfiod ctl cancel", "exit_status": code}


def test_2_bad_request_from_the_daemon_is_usage(capsys: pytest.CaptureFixture[str]) -> None:
    d = ScriptedDaemon(lambda op, args: {"error": {"code": "bad_request", "message": "no"}})
    try:
        assert ctl(d, "status", capsys=capsys)[0] == Exit.USAGE == 2
    finally:
        d.close()


@pytest.mark.parametrize("bad, needle", [
    (["--downtime-limit", "-5"], "'downtime_limit_ms' must be a number"),
    (["--timeout", "nan"], "'timeout_s' must be a number"),
    (["--timeout", "inf"], "'timeout_s' must be a number"),
    (["--to", "localhost"], "must be HOST:PORT"),
    (["--to", "localhost:99999"], "must be a number 0..65535"),
])
def test_2_bad_migrate_arguments_never_reach_the_daemon(
        daemon: ScriptedDaemon, capsys: pytest.CaptureFixture[str], bad: list[str],
        needle: str) -> None:
    args = {"--to": "127.0.0.1:4444"}
    args.update(dict(zip(bad[::2], bad[1::2], strict=True)))
    argv = [x for kv in args.items() for x in kv]
    code, out, err = ctl(daemon, "migrate", "g1", *argv, capsys=capsys)
    assert code == Exit.USAGE and needle in err, err
    code, out, err = ctl(daemon, "migrate", "g1", *argv, "--json", capsys=capsys)
    assert code == Exit.USAGE and err == ""
    obj = _json_error(out)
    assert obj["code"] == "usage" and needle in obj["message"]
    assert daemon.requests == []


def test_2_argparse_usage_errors_are_json_with_json(capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    code = main(["ctl", "migrate", "g1", "--json"])            # --to missing
    out, err = capsys.readouterr()
    assert code == Exit.USAGE and err == ""
    obj = _json_error(out)
    assert obj["code"] == "usage" and "--to" in obj["message"]
    code = main(["ctl", "migrate", "g1"])
    out, err = capsys.readouterr()
    assert code == Exit.USAGE and out == "" and "the following arguments are required: --to" in err


def test_3_no_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "none.sock")
    code, out, err = ctl(path, "status", capsys=capsys)
    assert code == Exit.UNREACHABLE and "is the daemon running?" in err
    code, out, err = ctl(path, "status", "--json", capsys=capsys)
    assert code == Exit.UNREACHABLE and _json_error(out)["code"] == "unreachable"


def _ctl_as_nobody(path: str, *args: str) -> tuple[int, str]:
    """``vfiod ctl`` in a forked child running as uid/gid 65534: (exit status, output)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                          # pragma: no cover - child
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            import sys
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), write_through=True)
            sys.stderr = sys.stdout
            code = main(["ctl", "--socket", path, *args])
            sys.stdout.flush()
            os._exit(code)
        except BaseException:
            os._exit(99)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_4_socket_0660_refuses_other_users(daemon: ScriptedDaemon) -> None:
    os.chmod(daemon.path, 0o660)                          # as the daemon creates it
    code, text = _ctl_as_nobody(daemon.path, "status")
    assert code == Exit.PERMISSION_DENIED, text
    assert "vfiod group" in text
    code, text = _ctl_as_nobody(daemon.path, "status", "--json")
    assert code == Exit.PERMISSION_DENIED
    assert _json_error(text)["code"] == "permission_denied"


def test_5_not_found_and_6_busy(capsys: pytest.CaptureFixture[str]) -> None:
    def answer(op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "check":
            return {"error": {"code": "not_found", "message": "no guest or device 'x'"}}
        return {"error": {"code": "busy", "message": "guest g1 is already migrating"}}
    d = ScriptedDaemon(answer)
    try:
        code, _, err = ctl(d, "check", "x", capsys=capsys)
        assert code == Exit.NOT_FOUND == 5 and "no guest or device 'x'" in err
        code, _, err = ctl(d, "migrate", "g1", "--to", "127.0.0.1:4444", capsys=capsys)
        assert code == Exit.BUSY == 6 and "already migrating" in err
    finally:
        d.close()


def test_130_ctrl_c(daemon: ScriptedDaemon, capsys: pytest.CaptureFixture[str],
                    monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*_: Any) -> int:
        raise KeyboardInterrupt
    monkeypatch.setitem(ctl_cmd._COMMANDS, "status", interrupt)
    code, out, err = ctl(daemon, "status", capsys=capsys)
    assert code == Exit.INTERRUPTED == 130 and "interrupted" in err


def test_141_reader_went_away_without_a_traceback(daemon: ScriptedDaemon) -> None:
    p = subprocess.Popen(vfiod_cmd("ctl", "--socket", daemon.path, "status"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    assert p.stdout is not None and p.stderr is not None
    p.stdout.read(10)                                      # like `head -c 10`
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(60) == Exit.PIPE_CLOSED, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# -- messages ------------------------------------------------------------------------------
def test_unresolvable_destination_is_a_readable_resolver_error(
        daemon: ScriptedDaemon, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_host(host: str, *_: Any, **__: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    code, out, err = ctl(daemon, "migrate", "g1", "--to", "nosuch.example:4444",
                         capsys=capsys)
    assert code == Exit.USAGE
    assert err == ("vfiod ctl migrate: cannot resolve the destination host 'nosuch.example': "
                   "Name or service not known\n")
    assert daemon.requests == []


def test_every_ctl_subcommand_help_has_an_example() -> None:
    ctl_parser = build_parser()._subparsers._group_actions[0].choices["ctl"]  # type: ignore[union-attr]
    subs = ctl_parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(subs) == set(ctl_cmd._COMMANDS)
    for name, p in subs.items():
        text = p.format_help()
        assert "example" in text and f"vfiod ctl {name}" in text.split("example")[1], name


def _helps() -> dict[str, str]:
    top = build_parser()
    cmds = top._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    out = {"vfiod": top.format_help()}
    for name in ("ctl", "devices", "run"):
        out[name] = cmds[name].format_help()
    for name, p in cmds["ctl"]._subparsers._group_actions[0].choices.items():  # type: ignore[union-attr]
        out[f"ctl {name}"] = p.format_help()
    return out


def test_help_cites_only_files_in_the_repo() -> None:
    import re
    for cmd, text in _helps().items():
        for doc in re.findall(r"[\w/.-]+\.md\b", text):
            assert (REPO / doc).exists() or (REPO / "docs" / doc).exists(), (cmd, doc)
