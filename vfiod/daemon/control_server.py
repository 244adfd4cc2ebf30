"""The control socket: a Unix stream socket speaking the JSON-lines protocol of
``vfiod.api`` (docs/architecture.md §6), for ``vfiod ctl`` and automation.

* Who may talk: the peer's credentials (``SO_PEERCRED``: pid, uid, gid) are checked on
  accept; root and members of the control group (``vfiod`` by default, primary or
  supplementary) are served, anyone else gets one ``permission_denied`` answer naming the
  uid and the group, and the connection is closed. The socket file is also mode 0660 and
  owned by that group, but the credential check is what counts (a socket inherited by
  another process still carries its creator's credentials).
* One JSON request per line, answered in order on the same connection; a bad line gets a
  clear error (``bad_json``, ``bad_request``, ``unsupported_schema``, ``unknown_op``) and the
  connection stays usable. Only a line over ``MAX_LINE`` closes it, since the stream cannot
  be re-synchronised after a truncated line.
* A handler that raises anything but ``ApiError`` is a daemon bug: the client gets
  ``internal`` with the exception's type and text, the traceback goes to the log, and the
  daemon keeps serving.
* Bounded service (README "Limits"): a thread per connection, at most ``max_clients`` at
  once. A connection must complete each request line within ``idle_timeout`` seconds of
  its previous answer (or of connecting), else it gets ``timeout`` and is closed, so a
  silent or one-byte-a-second client cannot hold a handler. When every handler is taken,
  the connection idle the longest (waiting for its next request, with no partial line) is
  closed with ``timeout`` to make room; only if every handler is inside a request does the
  newcomer get ``busy``. Requests nest at most ``MAX_DEPTH`` deep (``vfiod.api.schema``).
* fds (``SCM_RIGHTS``) may come with a request line, received with ``MSG_CMSG_CLOEXEC``
  and tied to the line whose bytes they arrived with; only ``attach`` takes them
  (``vfiod.api.ops.FD_OPS``, at most ``MAX_FDS``), any other request carrying fds is
  refused. The server closes every received fd once the request was answered (the
  handler keeps its own copies), and those of a connection that goes away
  (docs/architecture.md §8.1).
* Running out of file descriptors (EMFILE, ENFILE) or kernel memory in ``accept`` pauses
  the accept loop with a doubling backoff (``backoff.py``) instead of spinning.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vfiod.api.ops import FD_OPS, MAX_FDS, Args, AttachArgs, parse_args
from vfiod.api.schema import MAX_LINE, ApiError, ApiErrorCode, Request, RequestError, Response
from vfiod.daemon.backoff import AcceptBackoff
from vfiod.daemon.received_fds import FD_BYTES, ReceivedFds, close_received
from vfiod.errors import VfiodError

log = logging.getLogger("vfiod.control")

#: Runs one validated request; returns the result object or raises ApiError.
Dispatch = Callable[[str, Args], dict[str, Any]]

#: Handler threads (connections served at once).
MAX_CLIENTS = 64
#: Seconds a connection may take to send its next complete request line.
IDLE_TIMEOUT_S = 60.0
#: listen() backlog: a burst of clients queues in the kernel instead of failing EAGAIN.
BACKLOG = 256
#: Seconds a newcomer waits, when every handler is inside a request, for one to finish:
#: a handler marks itself idle just after its answer leaves, so a client that reconnects
#: at once must not be told "busy" by that gap.
BUSY_GRACE_S = 0.2


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    #: monotonic time it began waiting for a new request; None inside a request
    idle_since: float | None = field(default_factory=time.monotonic)
    evicted: bool = False


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    """The connecting process's credentials as the kernel recorded them at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def proc_groups(cred: PeerCred, proc_root: str = "/proc") -> frozenset[int]:
    """The peer's supplementary groups from /proc/PID/status (empty if unreadable: the
    process may have exited, and then it is refused unless root or the primary group)."""
    try:
        with open(os.path.join(proc_root, str(cred.pid), "status"), encoding="ascii",
                  errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
    except OSError:
        pass
    return frozenset()


def check_peer(cred: PeerCred, allowed_gid: int | None, group_name: str,
               groups: Callable[[PeerCred], frozenset[int]] = proc_groups) -> str | None:
    """None if ``cred`` may use the socket, else the refusal message."""
    if cred.uid == 0:
        return None
    if allowed_gid is not None and (cred.gid == allowed_gid or allowed_gid in groups(cred)):
        return None
    why = (f"group {group_name!r} (gid {allowed_gid})" if allowed_gid is not None else
           f"group {group_name!r}, which does not exist on this host")
    return (f"uid {cred.uid} (pid {cred.pid}) is neither root nor a member of {why}: "
            "ask an administrator to add you to that group")


class ControlServer:
    def __init__(self, path: str, dispatch: Dispatch, *, group: str = "vfiod",
                 allowed_gid: int | None = None, max_clients: int = MAX_CLIENTS,
                 idle_timeout: float = IDLE_TIMEOUT_S,
                 on_request: Callable[[bool], None] | None = None,
                 on_refused: Callable[[], None] | None = None,
                 groups: Callable[[PeerCred], frozenset[int]] = proc_groups) -> None:
        self.path = path
        self.dispatch = dispatch
        self.group = group
        self.allowed_gid = allowed_gid
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self._on_request = on_request or (lambda ok: None)
        self._on_refused = on_refused or (lambda: None)
        self._groups = groups
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)   # a handler became idle or left
        self._closing = False
        self._closed = threading.Event()
        self.backoff = AcceptBackoff("control", self._closed.wait)

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Bind and listen (synchronously: when this returns, clients can connect)."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o660)
            if self.allowed_gid is not None:
                try:
                    os.chown(self.path, -1, self.allowed_gid)
                except OSError as e:       # not root and not in the group: root-only then
                    log.warning("cannot give %s to group %s: %s", self.path, self.group,
                                e.strerror)
            sock.listen(BACKLOG)
        except OSError as e:
            sock.close()
            raise VfiodError(f"control socket {self.path}: {errno.errorcode.get(e.errno or 0, e)}"
                             f" ({e.strerror})") from None
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="vfiod-control",
                                        daemon=True)
        self._thread.start()

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise VfiodError(f"control socket {self.path} exists and is not a socket; "
                             "refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)           # nobody listens: left over from a crash
            return
        finally:
            probe.close()
        raise VfiodError(f"control socket {self.path} is in use: another vfiod is running")

    def close(self) -> None:
        self._closing = True
        self._closed.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)   # wakes accept() in the server thread
            except OSError:
                pass
            sock.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # -- serving ---------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closing and self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError as e:
                if self._closing:
                    return
                self.backoff.failed(e.errno)
                continue
            self.backoff.succeeded()
            client = _Client(conn)
            with self._lock:
                if len(self._clients) >= self.max_clients:
                    self._evict_idlest()
                if len(self._clients) >= self.max_clients:
                    self._idle.wait_for(lambda: any(c.idle_since is not None
                                                    for c in self._clients)
                                        or len(self._clients) < self.max_clients,
                                        timeout=BUSY_GRACE_S)
                    if len(self._clients) >= self.max_clients:
                        self._evict_idlest()
                full = len(self._clients) >= self.max_clients
                if not full:
                    self._clients.add(client)
            if full:
                self._refuse(conn, ApiError(
                    ApiErrorCode.BUSY, f"all {self.max_clients} control connections are "
                    "inside a request; try again"))
                continue
            threading.Thread(target=self._serve, args=(client,), name="vfiod-control-conn",
                             daemon=True).start()

    def _evict_idlest(self) -> None:
        """Close the connection idle the longest, if any is idle (server lock held)."""
        idle = [c for c in self._clients if c.idle_since is not None]
        if not idle:
            return
        victim = min(idle, key=lambda c: c.idle_since or 0.0)
        victim.evicted = True
        self._clients.discard(victim)
        waited = time.monotonic() - (victim.idle_since or 0.0)
        self._tell(victim.sock, ApiError(
            ApiErrorCode.TIMEOUT, f"closed after {waited:.1f} s idle: all "
            f"{self.max_clients} control connections were taken"))
        try:
            victim.sock.shutdown(socket.SHUT_RDWR)   # its handler's recv() returns
        except OSError:
            pass

    @staticmethod
    def _tell(conn: socket.socket, err: ApiError) -> None:
        """One error line, without blocking the accept loop (best effort)."""
        try:
            conn.send(Response.failure(None, err).encode(), socket.MSG_DONTWAIT)
        except OSError:
            pass

    def _refuse(self, conn: socket.socket, err: ApiError) -> None:
        self._tell(conn, err)
        conn.close()

    def _serve(self, client: _Client) -> None:
        conn = client.sock
        try:
            cred = peer_cred(conn)
            why = check_peer(cred, self.allowed_gid, self.group, self._groups)
            if why is not None:
                log.warning("control: refused %s", why)
                self._on_refused()
                self._refuse(conn, ApiError(ApiErrorCode.PERMISSION_DENIED, why))
                return
            self._serve_lines(client)
        except OSError:
            pass                           # the client went away
        finally:
            with self._lock:
                self._clients.discard(client)
                self._idle.notify_all()
            conn.close()

    def _serve_lines(self, client: _Client) -> None:
        fds = ReceivedFds()
        try:
            self._serve_lines_with(client, fds)
        finally:
            fds.close_all()

    def _serve_lines_with(self, client: _Client, fds: ReceivedFds) -> None:
        conn = client.sock
        buf = b""
        base = 0                    # stream offset of buf[0]: fds are tied to offsets
        deadline = time.monotonic() + self.idle_timeout
        while True:
            while b"\n" not in buf:
                if len(buf) > MAX_LINE:
                    err = ApiError(ApiErrorCode.TOO_LARGE, f"request line exceeds {MAX_LINE} "
                                   "bytes; closing the connection")
                    self._on_request(False)
                    conn.sendall(Response.failure(None, err).encode())
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    self._tell(conn, ApiError(ApiErrorCode.TIMEOUT, "no complete request "
                                              f"within {self.idle_timeout:g} s; closing"))
                    return
                with self._lock:
                    if client.evicted:
                        return
                    client.idle_since = None if buf else time.monotonic()
                    if not buf:
                        self._idle.notify_all()
                conn.settimeout(left)
                try:
                    chunk, ancdata, flags, _ = conn.recvmsg(
                        65536, socket.CMSG_SPACE(MAX_FDS * FD_BYTES), socket.MSG_CMSG_CLOEXEC)
                except TimeoutError:
                    continue
                fds.add(base + len(buf), ancdata, bool(flags & socket.MSG_CTRUNC))
                with self._lock:
                    if client.evicted:
                        return
                    client.idle_since = None
                if not chunk:
                    return
                buf += chunk
            line, _, buf = buf.partition(b"\n")
            end = base + len(line) + 1
            base = end
            sent, cut = fds.take_before(end)
            try:
                if not line.strip():
                    continue
                resp = self.handle_line(line, sent, cut)
            finally:
                for fd in sent:
                    close_received(fd)
            self._on_request(resp.ok)
            conn.settimeout(self.idle_timeout)   # a client that never reads is dropped
            conn.sendall(resp.encode())
            deadline = time.monotonic() + self.idle_timeout

    def handle_line(self, line: bytes, fds: tuple[int, ...] = (),
                    cut: bool = False) -> Response:
        """One request line (with the fds that came with it) → its response (never
        raises; the caller closes the fds)."""
        try:
            req = Request.decode(line)
        except RequestError as e:
            return Response.failure(e.request_id, e)
        except ApiError as e:
            return Response.failure(None, e)
        try:
            args = parse_args(req.op, req.args)
            if cut:
                raise ApiError(ApiErrorCode.BAD_REQUEST, f"{req.op}: more than {MAX_FDS} fds "
                               "were sent with it; the kernel dropped the rest")
            if fds and req.op not in FD_OPS:
                raise ApiError(ApiErrorCode.BAD_REQUEST, f"{req.op}: {len(fds)} fd(s) came "
                               f"with it; only {', '.join(FD_OPS)} takes fds")
            if isinstance(args, AttachArgs):
                args = dataclasses.replace(args, fds=fds)
            return Response.success(req.id, self.dispatch(req.op, args))
        except ApiError as e:
            return Response.failure(req.id, e)
        except Exception as e:  # noqa: BLE001 - a handler bug must not kill the server
            log.exception("control: %s failed", req.op)
            return Response.failure(req.id, ApiError(
                ApiErrorCode.INTERNAL, f"{req.op}: internal error: {type(e).__name__}: {e}"))

