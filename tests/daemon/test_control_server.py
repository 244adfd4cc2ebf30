"""The control socket server in-process (docs/architecture.md §6): peer credentials (crafted ones and a
real unprivileged client), serving after errors, the socket file's life cycle."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.as_nobody import call_as_nobody
from vfiod.api import ApiError, ApiErrorCode, ClientError, ControlClient
from vfiod.api.ops import Args
from vfiod.daemon.control_peers import PeerCred, check_peer, proc_groups
from vfiod.daemon.control_server import ControlServer
from vfiod.errors import VfiodError


def dispatch(op: str, args: Args) -> dict[str, Any]:
    if op == "hello":
        return {"hello": "world"}
    if op == "devices":
        raise RuntimeError("handler bug")
    raise ApiError(ApiErrorCode.NOT_FOUND, f"{op}: nothing here")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vfiod-ctl-test-"))
    os.chmod(d, 0o755)            # an unprivileged client must be able to reach the socket
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(sockdir: Path) -> Iterator[ControlServer]:
    refused: list[int] = []
    srv = ControlServer(str(sockdir / "control.sock"), dispatch, group="vfiod-test",
                        allowed_gid=4242, on_refused=lambda: refused.append(1))
    srv.refused = refused  # type: ignore[attr-defined]
    srv.start()
    try:
        yield srv
    finally:
        srv.close()


def test_root_and_group_members_are_served() -> None:
    none: frozenset[int] = frozenset()
    assert check_peer(PeerCred(10, 0, 0), None, "vfiod", lambda c: none) is None
    assert check_peer(PeerCred(10, 1000, 4242), 4242, "vfiod", lambda c: none) is None
    assert check_peer(PeerCred(10, 1000, 100), 4242, "vfiod",
                      lambda c: frozenset({27, 4242})) is None


def test_others_are_refused_with_a_reason() -> None:
    why = check_peer(PeerCred(77, 1000, 100), 4242, "vfiod", lambda c: frozenset({27}))
    assert why == ("uid 1000 (pid 77) is neither root nor a member of group 'vfiod' (gid "
                   "4242): ask an administrator to add you to that group")
    why = check_peer(PeerCred(77, 1000, 100), None, "vfiod", lambda c: frozenset())
    assert why is not None and "which does not exist on this host" in why


def test_supplementary_groups_from_proc(tmp_path: Path) -> None:
    (tmp_path / "123").mkdir()
    (tmp_path / "123" / "status").write_text("Name:\tx\nGroups:\t27 4242 \nVmLck:\t0 kB\n")
    assert proc_groups(PeerCred(123, 1000, 100), str(tmp_path)) == frozenset({27, 4242})
    assert proc_groups(PeerCred(999, 1000, 100), str(tmp_path)) == frozenset()  # gone


def _as_nobody(path: str) -> dict[str, Any]:
    """Call ``hello`` as uid/gid 65534 from a forked child; returns what it saw."""
    return call_as_nobody(path, lambda c: c.call("hello"))


def test_unprivileged_peer_is_refused_on_a_real_socket(server: ControlServer) -> None:
    # The socket file's mode (0660, root:group) is the first gate; open it up so the
    # credential check, which also covers inherited sockets, is what answers.
    assert os.stat(server.path).st_mode & 0o777 == 0o660
    os.chmod(server.path, 0o666)
    seen = _as_nobody(server.path)
    assert seen.get("kind") == "api" and seen["code"] == "permission_denied", seen
    assert "uid 65534" in seen["message"]
    assert "group 'vfiod-test' (gid 4242)" in seen["message"]
    assert server.refused == [1]  # type: ignore[attr-defined]
    # Root (this test process) is still served.
    with ControlClient(server.path) as c:
        assert c.call("hello") == {"hello": "world"}


def test_errors_do_not_stop_the_server(server: ControlServer) -> None:
    with ControlClient(server.path) as c:
        with pytest.raises(ClientError) as exc:
            c.call("devices")
        assert exc.value.code is ApiErrorCode.INTERNAL
        assert "devices: internal error: RuntimeError: handler bug" in exc.value.message
        with pytest.raises(ClientError) as exc:
            c.call("status")
        assert exc.value.code is ApiErrorCode.NOT_FOUND
        c.send_raw(b"\n\n{broken\n")            # blank lines are skipped
        bad = c.read_response()
        assert bad.error is not None and bad.error.code is ApiErrorCode.BAD_JSON
        assert c.call("hello") == {"hello": "world"}


def test_client_limit(sockdir: Path) -> None:
    """With every handler taken, an idle connection makes room for a new one."""
    srv = ControlServer(str(sockdir / "c.sock"), dispatch, max_clients=1)
    srv.start()
    try:
        with ControlClient(srv.path) as first:
            assert first.call("hello")
            with ControlClient(srv.path) as second:
                assert second.call("hello") == {"hello": "world"}
            with pytest.raises(ClientError) as exc:
                first.call("hello")
            assert exc.value.code is ApiErrorCode.TIMEOUT
    finally:
        srv.close()


def test_socket_file_life_cycle(sockdir: Path) -> None:
    path = sockdir / "life.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))                     # left over by a crashed daemon
    stale.close()
    srv = ControlServer(str(path), dispatch)
    srv.start()
    try:
        other = ControlServer(str(path), dispatch)
        with pytest.raises(VfiodError, match="is in use: another vfiod is running"):
            other.start()
    finally:
        srv.close()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(VfiodError, match="exists and is not a socket"):
        ControlServer(str(path), dispatch).start()
    assert path.read_text() == "not a socket"


def test_client_reports_missing_daemon(sockdir: Path) -> None:
    with pytest.raises(ClientError) as exc:
        ControlClient(str(sockdir / "none.sock"))
    assert exc.value.kind == "connect" and "ENOENT" in exc.value.message


def test_pipelined_requests_are_answered_in_order(server: ControlServer) -> None:
    """Several requests sent at once on one connection, before any answer is read (the
    load generator's way, README "Load"), get their answers in the order sent."""
    with ControlClient(server.path) as c:
        c.send_raw(b"".join(json.dumps({"schema": 1, "id": i, "op": op}).encode() + b"\n"
                            for i, op in enumerate(["hello", "nope", "hello"] * 20)))
        answers = [c.read_response() for _ in range(60)]
    assert [a.id for a in answers] == list(range(60))
    assert [a.ok for a in answers[:3]] == [True, False, True]
