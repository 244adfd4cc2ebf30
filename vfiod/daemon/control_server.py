"""The control socket: a Unix stream socket speaking the JSON-lines protocol of
``vfiod.api`` (docs/architecture.md §6), for ``vfiod ctl`` and automation.

* Who may talk (``control_peers.py``): the peer's credentials (``SO_PEERCRED``) are
  checked as it is accepted; root and members of the control group (``vfiod`` by default,
  primary or supplementary) are served, anyone else gets one ``permission_denied`` answer
  naming the uid and the group, and the connection is closed. The socket file is also
  mode 0660 and owned by that group, but the credential check is what counts (a socket
  inherited by another process still carries its creator's credentials).
* One JSON request per line, answered in order on the same connection; a bad line gets a
  clear error (``control_requests.py``: ``bad_json``, ``bad_request``,
  ``unsupported_schema``, ``unknown_op``, ``internal`` for a handler bug) and the
  connection stays usable. Only a line over ``MAX_LINE`` closes it, since the stream
  cannot be re-synchronised after a truncated line.
* One loop thread (``vfiod-control``) accepts and reads every connection; a complete
  request line goes to a worker thread (``control_workers.py``; ``control_requests.py``
  answers it, those pipelined behind it and those that come within ``LINGER_S``). An
  idle connection costs no thread: with a thread started per connection, a ``status``
  that arrived in a burst of 100 waited behind every start (docs/benchmarks.md §7.1).
* Bounded service (README "Limits"): at most ``max_clients`` connections at once. A
  connection must complete each request line within ``idle_timeout`` seconds of its
  previous answer (or of connecting), else it gets ``timeout`` and is closed, so a silent
  or one-byte-a-second client cannot hold a place. When every place is taken, the
  connection idle the longest (waiting for its next request, with no partial line) is
  closed with ``timeout`` to make room; only if every connection is inside a request for
  ``BUSY_GRACE_S`` does the newcomer get ``busy``. Requests nest at most ``MAX_DEPTH``
  deep (``vfiod.api.schema``).
* fds (``SCM_RIGHTS``) may come with a request line, received with ``MSG_CMSG_CLOEXEC``
  and tied to the line whose bytes they arrived with (``control_conn.py``); only
  ``attach`` takes them (``vfiod.api.ops.FD_OPS``, at most ``MAX_FDS``). The server
  closes every received fd once the request was answered (the handler keeps its own
  copies), and those of a connection that goes away (docs/architecture.md §8.1).
* Running out of file descriptors (EMFILE, ENFILE) or kernel memory in ``accept`` stops
  accepting for a doubling pause (``backoff.py``) instead of spinning; the connections
  already admitted are served meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable

from vfiod.api.schema import MAX_LINE, ApiError, ApiErrorCode, Response
from vfiod.daemon.backoff import AcceptBackoff
from vfiod.daemon.control_conn import ControlConn, RequestLine
from vfiod.daemon.control_peers import PeerCred, check_peer, peer_cred, proc_groups
from vfiod.daemon.control_requests import (
    LINGER_S,
    Dispatch,
    answer_requests,
    answer_too_large,
)
from vfiod.daemon.control_socket_file import listen_control_socket
from vfiod.daemon.control_workers import RequestWorkers

log = logging.getLogger("vfiod.control")

#: Connections served at once.
MAX_CLIENTS = 64
#: Seconds a connection may take to send its next complete request line.
IDLE_TIMEOUT_S = 60.0
#: listen() backlog: a burst of clients queues in the kernel instead of failing EAGAIN.
BACKLOG = 256
#: Seconds a newcomer waits, when every connection is inside a request, for one to
#: finish: a connection is idle again only once its answer left and the loop took it
#: back, so a client that reconnects at once must not be told "busy" by that gap.
BUSY_GRACE_S = 0.2

#: selector keys' data for the listening socket and the workers' wake-up socket
_ACCEPT, _WAKE = object(), object()


class ControlServer:
    def __init__(self, path: str, dispatch: Dispatch, *, group: str = "vfiod",
                 allowed_gid: int | None = None, max_clients: int = MAX_CLIENTS,
                 idle_timeout: float = IDLE_TIMEOUT_S, linger_s: float = LINGER_S,
                 on_request: Callable[[bool], None] | None = None,
                 on_refused: Callable[[], None] | None = None,
                 groups: Callable[[PeerCred], frozenset[int]] = proc_groups) -> None:
        self.path = path
        self.dispatch = dispatch
        self.group = group
        self.allowed_gid = allowed_gid
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.linger_s = linger_s
        self._on_request = on_request or (lambda ok: None)
        self._on_refused = on_refused or (lambda: None)
        self._groups = groups
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        #: admitted connections; only the loop thread changes the set
        self._clients: set[ControlConn] = set()
        #: newcomers waiting, up to their deadline, for a connection to become idle
        self._waiting: list[tuple[socket.socket, float]] = []
        #: (connection, still usable) handed back by the worker that answered it
        self._answered: queue.SimpleQueue[tuple[ControlConn, bool]] = queue.SimpleQueue()
        self._workers = RequestWorkers("vfiod-control-req")
        self._lock = threading.Lock()      # hand-backs against the loop's final cleanup
        self._finished = False
        self._closing = False
        self._accept_resume: float | None = None
        #: readable while a newcomer waits: lingering workers hand their connection back
        self._room_r = self._room_w = -1
        self._room_flagged = False
        self.backoff = AcceptBackoff("control", self._pause_accepting)

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Bind and listen (synchronously: when this returns, clients can connect)."""
        sock = listen_control_socket(self.path, self.group, self.allowed_gid, BACKLOG)
        sock.setblocking(False)
        self._sock = sock
        self._room_r, self._room_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(sock, selectors.EVENT_READ, _ACCEPT)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._thread = threading.Thread(target=self._loop, name="vfiod-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving: the loop closes every connection (a request being answered
        loses its connection when its worker hands it back) and the socket file goes."""
        self._closing = True
        if self._thread is None:       # never started: the file, if any, is not ours
            return
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while not self._closing:
                try:
                    self._turn(sel)
                except Exception:  # noqa: BLE001 - the control socket must outlive a bug
                    log.exception("control: loop error (serving on)")
        finally:
            self._shut()

    def _turn(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        self._resume_accepting(now)
        for key, _ in sel.select(self._next_timeout(now)):
            if key.data is _ACCEPT:
                self._accept_ready()
            elif key.data is _WAKE:
                self._drain_wake()
            elif key.data in self._clients and not key.data.in_request:
                self._read_ready(key.data)     # (not dropped earlier in this batch)
        self._take_back_answered()
        self._expire(time.monotonic())

    def _next_timeout(self, now: float) -> float:
        due = [c.deadline for c in self._clients if not c.in_request]
        due += [deadline for _, deadline in self._waiting]
        if self._accept_resume is not None:
            due.append(self._accept_resume)
        return max(0.0, min(due) - now) if due else self.idle_timeout

    def _shut(self) -> None:
        with self._lock:
            self._finished = True
        for c in self._clients:
            if c.in_request:   # its worker is using the socket: it closes it at hand-back
                with contextlib.suppress(OSError):
                    c.sock.shutdown(socket.SHUT_RDWR)
            else:
                c.close()
        self._clients.clear()
        for sock, _ in self._waiting:
            sock.close()
        self._waiting.clear()
        while not self._answered.empty():
            c, _ = self._answered.get()
            c.close()
        for s in (self._sock, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        # a worker still lingering on the room fd fails EBADF: its connection is closed
        os.close(self._room_r)
        os.close(self._room_w)
        self._sock = None
        if self._sel is not None:
            self._sel.close()

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):      # full: the loop is woken already
                self._wake_w.send(b"\0")

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    # -- accepting -------------------------------------------------------------------------
    def _accept_ready(self) -> None:
        """Accept every connection the kernel has queued (a burst costs no thread)."""
        while not self._closing and self._sock is not None and self._accept_resume is None:
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if self._closing:
                    return
                self.backoff.failed(e.errno)
                continue
            self.backoff.succeeded()
            self._admit(conn)

    def _pause_accepting(self, seconds: float) -> None:
        """Out of fds (``backoff.py``): stop accepting for ``seconds``, serving the rest."""
        self._accept_resume = time.monotonic() + seconds
        if self._sel is not None and self._sock is not None:
            self._sel.unregister(self._sock)

    def _resume_accepting(self, now: float) -> None:
        if self._accept_resume is not None and now >= self._accept_resume:
            self._accept_resume = None
            if self._sel is not None and self._sock is not None:
                self._sel.register(self._sock, selectors.EVENT_READ, _ACCEPT)

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            why = check_peer(peer_cred(conn), self.allowed_gid, self.group, self._groups)
        except OSError:
            conn.close()                   # the client went away
            return
        if why is not None:
            log.warning("control: refused %s", why)
            self._on_refused()
            self._refuse(conn, ApiError(ApiErrorCode.PERMISSION_DENIED, why))
            return
        self._waiting.append((conn, time.monotonic() + BUSY_GRACE_S))
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        """Let waiting newcomers in, in order, while there is room or an idle connection
        to close for it; while one still waits, lingering workers are asked to hand
        theirs back."""
        while self._waiting and (len(self._clients) < self.max_clients
                                 or self._evict_idlest()):
            sock, _ = self._waiting.pop(0)
            c = ControlConn(sock, deadline=time.monotonic() + self.idle_timeout)
            self._clients.add(c)
            self._watch(c)
        self._flag_room()

    def _flag_room(self) -> None:
        """The room fd is readable exactly while a newcomer waits."""
        if bool(self._waiting) != self._room_flagged:
            self._room_flagged = bool(self._waiting)
            if self._room_flagged:
                os.write(self._room_w, b"\0")
            else:
                os.read(self._room_r, 1)

    def _evict_idlest(self) -> bool:
        """Make room: close the connection idle the longest. One that sent something the
        loop has not read yet is read first and is not idle then: in a burst accepted at
        once, a client's request may be waiting behind the accepts."""
        idle = [c for c in self._clients if c.idle_since is not None and not c.in_request]
        for c in sorted(idle, key=lambda c: c.idle_since or 0.0):
            self._read_ready(c)
            if c not in self._clients:
                return True                # it had left
            if c.idle_since is None or c.in_request:
                continue
            waited = time.monotonic() - c.idle_since
            self._tell(c.sock, ApiError(
                ApiErrorCode.TIMEOUT, f"closed after {waited:.1f} s idle: all "
                f"{self.max_clients} control connections were taken"))
            self._drop(c)
            return True
        return False

    def _expire(self, now: float) -> None:
        for c in [c for c in self._clients if not c.in_request and c.deadline <= now]:
            self._tell(c.sock, ApiError(ApiErrorCode.TIMEOUT, "no complete request within "
                                        f"{self.idle_timeout:g} s; closing"))
            self._drop(c)
        self._admit_waiting()
        while self._waiting and self._waiting[0][1] <= now:
            sock, _ = self._waiting.pop(0)
            self._refuse(sock, ApiError(
                ApiErrorCode.BUSY, f"all {self.max_clients} control connections are "
                "inside a request; try again"))
        self._flag_room()

    @staticmethod
    def _tell(conn: socket.socket, err: ApiError) -> None:
        """One error line, without blocking the loop (best effort)."""
        try:
            conn.send(Response.failure(None, err).encode(), socket.MSG_DONTWAIT)
        except OSError:
            pass

    def _refuse(self, conn: socket.socket, err: ApiError) -> None:
        self._tell(conn, err)
        conn.close()

    # -- reading and answering -------------------------------------------------------------
    def _watch(self, c: ControlConn) -> None:
        assert self._sel is not None
        self._sel.register(c.sock, selectors.EVENT_READ, c)

    def _drop(self, c: ControlConn) -> None:
        """Let go of a connection the loop is watching."""
        assert self._sel is not None
        self._sel.unregister(c.sock)
        self._clients.discard(c)
        c.close()

    def _read_ready(self, c: ControlConn) -> None:
        try:
            alive = c.read()
        except BlockingIOError:
            return
        except OSError:
            alive = False                  # the client went away
        if not alive:
            self._drop(c)                  # its place goes to a waiting one at _expire
        elif not self._start_request(c, watched=True) and not c.buf:
            c.idle_since = time.monotonic()     # blank lines only: still idle

    def _start_request(self, c: ControlConn, watched: bool) -> bool:
        """Hand its next complete request line to a worker (True), or else a line grown
        past ``MAX_LINE`` (the stream cannot be re-synchronised: it is closed). The
        loop stops watching it until the worker hands it back."""
        req = c.next_line()
        if req is None and len(c.buf) <= MAX_LINE:
            return False
        if watched:
            assert self._sel is not None
            self._sel.unregister(c.sock)
        c.in_request, c.idle_since = True, None
        if req is None:
            self._workers.submit(lambda: self._too_large(c))
        else:
            self._workers.submit(lambda: self._answer(c, req))
        return True

    def _take_back_answered(self) -> None:
        while not self._answered.empty():
            c, alive = self._answered.get()
            if not alive:
                self._clients.discard(c)
                c.close()
            else:
                c.waiting(self.idle_timeout)
                if not self._start_request(c, watched=False):
                    self._watch(c)
        self._admit_waiting()

    def _hand_back(self, c: ControlConn, alive: bool) -> None:
        with self._lock:
            if not self._finished:
                self._answered.put((c, alive))
                self._wake()
                return
        c.close()

    def _answer(self, c: ControlConn, req: RequestLine) -> None:
        alive = False
        try:
            alive = answer_requests(c, req, self.dispatch, self.idle_timeout, self._on_request,
                                    self._room_r, self.linger_s)
        finally:
            self._hand_back(c, alive)

    def _too_large(self, c: ControlConn) -> None:
        try:
            answer_too_large(c, self.idle_timeout, self._on_request)
        finally:
            self._hand_back(c, False)
