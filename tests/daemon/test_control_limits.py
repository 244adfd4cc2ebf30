"""The control socket's limits (README "Limits"): nesting depth, the idle timeout, the
bounded handlers (the idlest connection makes room), the accept loop's backoff on EMFILE,
and ``check`` reading host facts outside the registry lock."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemons import wait_until
from vfiod.api import ApiErrorCode, ClientError, ControlClient
from vfiod.api.ops import Args
from vfiod.api.schema import MAX_DEPTH, Request, Response
from vfiod.daemon.backoff import ACCEPT_BACKOFF_S
from vfiod.daemon.control_server import ControlServer


def dispatch(op: str, args: Args) -> dict[str, Any]:
    return {"op": op}


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vfiod-limits-test-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _server(sockdir: Path, **kw: Any) -> ControlServer:
    srv = ControlServer(str(sockdir / "c.sock"), dispatch, **kw)
    srv.start()
    return srv


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def _read_answer(s: socket.socket) -> Response:
    """The next answer line; then the connection must be closed."""
    data = b""
    while b"\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed without an answer (got {data!r})"
        data += chunk
    return Response.decode(data.partition(b"\n")[0])


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(65536) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("line", [
    b"[" * 100_000,
    b'{"schema":1,"id":5,"op":"hello","args":{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
])
def test_deep_nesting_is_a_bad_request_and_the_connection_stays(sockdir: Path,
                                                                line: bytes) -> None:
    srv = _server(sockdir)
    try:
        with ControlClient(srv.path) as c:
            c.send_raw(line + b"\n")
            resp = c.read_response()
            assert resp.error is not None and resp.error.code is ApiErrorCode.BAD_REQUEST
            assert resp.error.message == (f"request nests 100001 levels of arrays and "
                                          f"objects; the limit is {MAX_DEPTH}") or \
                resp.error.message.endswith(f"the limit is {MAX_DEPTH}")
            assert c.call("hello") == {"op": "hello"}
    finally:
        srv.close()


def test_nesting_up_to_the_limit_is_accepted() -> None:
    inner: Any = 1
    for _ in range(MAX_DEPTH - 2):      # the request object and args are two levels
        inner = [inner]
    req = Request.decode(Request("hello", {"x": inner}).encode())
    assert req.args == {"x": inner}
    with pytest.raises(Exception, match="limit is"):
        Request.decode(Request("hello", {"x": [inner]}).encode())
    # Brackets inside strings are text, not nesting.
    assert Request.decode(Request("hello", {"x": "[" * 1000}).encode()).args == \
        {"x": "[" * 1000}


def test_an_idle_or_slow_connection_gets_timeout_and_is_closed(sockdir: Path) -> None:
    srv = _server(sockdir, idle_timeout=0.3)
    try:
        idle, slow = _raw(srv.path), _raw(srv.path)
        slow.sendall(b'{"schema":1,"op":')       # never completes its line
        for s in (idle, slow):
            resp = _read_answer(s)
            assert resp.error is not None and resp.error.code is ApiErrorCode.TIMEOUT
            assert resp.error.message == "no complete request within 0.3 s; closing"
            assert _closed(s)
            s.close()
        with ControlClient(srv.path) as c:      # the deadline restarts after each answer
            assert c.call("hello") and c.call("status")
    finally:
        srv.close()


def test_idle_connections_make_room_for_a_new_client(sockdir: Path) -> None:
    srv = _server(sockdir, max_clients=4)
    try:
        idle = [_raw(srv.path) for _ in range(4)]
        wait_until(lambda: len(srv._clients) == 4, 10, "four handlers")
        with ControlClient(srv.path) as c:      # the fifth is served at once
            assert c.call("hello") == {"op": "hello"}
        resp = _read_answer(idle[0])            # the idlest made room
        assert resp.error is not None and resp.error.code is ApiErrorCode.TIMEOUT
        assert "idle: all 4 control connections were taken" in resp.error.message
        assert _closed(idle[0])
        for s in idle:
            s.close()
    finally:
        srv.close()


def test_busy_only_when_every_handler_is_inside_a_request(sockdir: Path) -> None:
    release = threading.Event()
    inside = threading.Semaphore(0)

    def slow(op: str, args: Args) -> dict[str, Any]:
        inside.release()
        release.wait(10)
        return {}

    srv = ControlServer(str(sockdir / "c.sock"), slow, max_clients=2)
    srv.start()
    try:
        held = [_raw(srv.path) for _ in range(2)]
        for s in held:
            s.sendall(Request("hello").encode())
        for _ in held:
            assert inside.acquire(timeout=10)
        with pytest.raises(ClientError) as exc, ControlClient(srv.path) as c:
            c.call("hello")
        assert exc.value.code is ApiErrorCode.BUSY
        assert exc.value.message == ("all 2 control connections are inside a request; "
                                     "try again")
        release.set()
        for s in held:
            assert _read_answer(s).ok
            s.close()
    finally:
        release.set()
        srv.close()


def test_a_burst_of_clients_queues_instead_of_failing(sockdir: Path) -> None:
    srv = _server(sockdir)
    try:
        socks = [_raw(srv.path) for _ in range(200)]   # EAGAIN past a backlog of 16
        for i, s in enumerate(socks):
            try:
                s.sendall(Request("hello").encode())
            except (BrokenPipeError, ConnectionResetError):
                # the newcomers closed it as the idlest; never one of the last 64
                assert i < 200 - 64, i
        assert all(_read_answer(s).ok for s in socks[-64:])
        for s in socks:
            s.close()
    finally:
        srv.close()


def test_idle_connections_hold_no_thread_and_request_threads_are_reused(
        sockdir: Path) -> None:
    """A burst of idle connections (the flood of docs/benchmarks.md §7) costs no thread:
    one loop thread reads every connection, and a request runs on a worker thread that
    then waits for the next request, so a second round of requests starts none. With a
    thread started per connection, a ``status`` arriving in such a burst waited behind
    every start."""
    srv = _server(sockdir)
    try:
        # threads that exit meanwhile (other servers' parked workers) do not matter:
        # only a thread started now would
        before = set(threading.enumerate())
        idle = [_raw(srv.path) for _ in range(64)]
        wait_until(lambda: len(srv._clients) == 64, 10, "64 admitted connections")
        assert set(threading.enumerate()) - before == set()
        workers = srv._workers
        started = []
        for n in (8, None):             # 8 requests at once, then as many as took a thread
            asking = idle[:n or started[0]]
            for s in asking:
                s.sendall(Request("hello").encode())
            assert all(_read_answer(s).ok for s in asking)
            started.append(workers.started)
            wait_until(lambda: workers.parked() == workers.started, 10, "the workers to park")
        assert 1 <= started[0] <= 8 and started[1] == started[0], started  # reused
        for s in idle:
            s.close()
        wait_until(lambda: not srv._clients, 10, "every connection to be let go")
    finally:
        srv.close()


def test_a_request_waiting_behind_a_burst_is_answered_not_evicted(sockdir: Path) -> None:
    """The loop accepts a burst before reading any of it: a connection whose request is
    already in the kernel when a newcomer needs its place is read, not closed as idle.
    The loop is held while A is admitted, so A's request and newcomer B both wait."""
    srv = ControlServer(str(sockdir / "c.sock"), dispatch, max_clients=1)
    held, release = threading.Event(), threading.Event()
    admit = srv._admit

    def held_admit(conn: socket.socket) -> None:
        if not held.is_set():
            held.set()
            release.wait(10)
        admit(conn)

    srv._admit = held_admit  # type: ignore[method-assign]
    srv.start()
    try:
        a = _raw(srv.path)
        a.sendall(Request("hello", id=7).encode())
        assert held.wait(10)
        b = _raw(srv.path)
        release.set()
        answer = _read_answer(a)
        assert answer.ok and answer.id == 7, answer
        with ControlClient(srv.path) as c:
            assert c.call("hello") == {"op": "hello"}
        for s in (a, b):
            s.close()
    finally:
        release.set()
        srv.close()


def test_a_worker_answers_an_active_client_until_a_newcomer_needs_its_place(
        sockdir: Path) -> None:
    """After an answer the worker reads on (``linger_s``, long here): a client's next
    requests are answered without the loop taking the connection back. A newcomer with
    no place makes it hand the idle connection back at once, to be closed as the idlest,
    instead of waiting out the linger and being told ``busy``."""
    srv = _server(sockdir, max_clients=1, linger_s=30.0)
    handed: list[bool] = []
    hand_back = srv._hand_back
    srv._hand_back = lambda c, alive: (handed.append(alive), hand_back(c, alive))[1]  # type: ignore[method-assign]
    try:
        a = _raw(srv.path)
        for i in range(20):
            a.sendall(Request("hello", id=i).encode())
            assert _read_answer(a).id == i
        assert handed == [] and srv._workers.started == 1
        with ControlClient(srv.path) as b:      # long before the 30 s linger ends
            assert b.call("hello") == {"op": "hello"}
        assert handed[0] is True
        resp = _read_answer(a)
        assert resp.error is not None and resp.error.code is ApiErrorCode.TIMEOUT, resp
        assert _closed(a)
        a.close()
    finally:
        srv.close()


def test_connections_numbered_past_fd_setsize_are_served(sockdir: Path) -> None:
    """A daemon holds many fds (guests' RAM, VFIO groups, devices): a connection whose fd
    is past select()'s FD_SETSIZE (1024) still gets its second request answered after
    the linger read."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1200
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    srv = _server(sockdir)
    try:
        with ControlClient(srv.path) as c:
            assert c.call("hello") == {"op": "hello"}
            (conn,) = srv._clients
            assert conn.sock.fileno() >= 1024
            assert c.call("hello") == {"op": "hello"}
    finally:
        srv.close()
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class _Emfile:
    """A listening socket whose accept() fails EMFILE ``n`` times, then the server closes."""

    def __init__(self, srv: ControlServer, n: int) -> None:
        self.srv, self.n, self.calls = srv, n, 0

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        if self.calls > self.n:
            self.srv._closing = True
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def test_accept_backs_off_on_emfile(sockdir: Path) -> None:
    srv = ControlServer(str(sockdir / "c.sock"), dispatch)
    pauses: list[float] = []
    fake = _Emfile(srv, 10)
    srv._sock = fake  # type: ignore[assignment]
    srv.backoff.pause = pauses.append
    srv._accept_ready()
    first, cap = ACCEPT_BACKOFF_S
    assert fake.calls == 11 and len(pauses) == 10      # a pause after every failure
    assert pauses[0] == first and pauses[-1] == cap
    assert pauses == sorted(pauses)
