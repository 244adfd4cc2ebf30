"""fds on the control socket (SCM_RIGHTS, docs/architecture.md §8.1): they reach the
``attach`` handler tied to their request line, are closed by the server once it answered,
and a peer that SO_PEERCRED refuses never gets them to a handler."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.as_nobody import call_as_nobody
from vfiod.api import ApiError, ApiErrorCode, AttachArgs, ClientError, ControlClient
from vfiod.api.ops import Args
from vfiod.daemon.control_server import ControlServer

RAM = [{"region": "ram", "gpa": 0, "size": 4096, "offset": 0, "fd": 0}]


class Recorder:
    """A dispatcher that notes the fds each attach saw, and the inodes behind them."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, ...]] = []
        self.inodes: list[int] = []

    def __call__(self, op: str, args: Args) -> dict[str, Any]:
        if not isinstance(args, AttachArgs):
            raise ApiError(ApiErrorCode.NOT_FOUND, f"{op}: nothing here")
        self.seen.append(args.fds)
        self.inodes += [os.fstat(fd).st_ino for fd in args.fds]
        return {"fds": len(args.fds)}


@pytest.fixture
def served() -> Iterator[tuple[ControlServer, Recorder]]:
    d = Path(tempfile.mkdtemp(prefix="vfiod-fds-test-"))
    os.chmod(d, 0o755)
    rec = Recorder()
    srv = ControlServer(str(d / "control.sock"), rec, group="vfiod-test", allowed_gid=4242)
    srv.start()
    try:
        yield srv, rec
    finally:
        srv.close()
        shutil.rmtree(d, ignore_errors=True)


def test_fds_reach_attach_and_are_closed_after_the_answer(served) -> None:
    srv, rec = served
    a, b = os.memfd_create("fds-a"), os.memfd_create("fds-b")
    try:
        with ControlClient(srv.path) as c:
            assert c.call("attach", {"guest": "g", "ram": RAM}, fds=[a]) == {"fds": 1}
            assert c.call("attach", {"guest": "g", "ram": RAM}, fds=[a, b]) == {"fds": 2}
            assert c.call("attach", {"guest": "g", "ram": RAM}) == {"fds": 0}
        assert [len(s) for s in rec.seen] == [1, 2, 0]
        assert rec.inodes == [os.fstat(a).st_ino, os.fstat(a).st_ino, os.fstat(b).st_ino]
        # the server's copies are closed: only the test's own fds still name the memfds
        assert _open_memfds("fds-a") == [a] and _open_memfds("fds-b") == [b]
    finally:
        os.close(a)
        os.close(b)


def _open_memfds(name: str) -> list[int]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{name} "):
                out.append(int(fd))
        except OSError:
            continue
    return out


def _attach_as_nobody(path: str, fd: int) -> dict[str, Any]:
    return call_as_nobody(path, lambda c: c.call("attach", {"guest": "g", "ram": RAM},
                                                 fds=[fd]))


def test_a_peer_so_peercred_refuses_never_hands_fds_over(served) -> None:
    srv, rec = served
    os.chmod(srv.path, 0o666)       # past the file mode: the credential check answers
    fd = os.memfd_create("fds-nobody")
    try:
        seen = _attach_as_nobody(srv.path, fd)
    finally:
        os.close(fd)
    assert seen.get("code") == "permission_denied", seen
    assert rec.seen == []


def test_more_fds_than_an_attach_takes_are_refused_and_closed(served) -> None:
    srv, rec = served
    a = os.memfd_create("fds-many")
    try:
        with ControlClient(srv.path) as c:
            with pytest.raises(ClientError) as e:
                c.call("attach", {"guest": "g", "ram": RAM}, fds=[a] * 65)
            assert e.value.code is ApiErrorCode.BAD_REQUEST
            assert "attach: more than 64 fds were sent with it" in e.value.message
            assert c.call("attach", {"guest": "g", "ram": RAM}, fds=[a] * 64) == {"fds": 64}
        assert _open_memfds("fds-many") == [a]
        assert [len(s) for s in rec.seen] == [64]
    finally:
        os.close(a)
