"""A control-socket client: what ``vfiod ctl`` and scripts use to talk to the daemon
(docs/architecture.md §6). Stdlib only, so it stays a leaf next to the schema it speaks.

    with ControlClient("/run/vfiod/control.sock") as c:
        result = c.call("status")                    # dict, or raises ClientError

``ClientError.kind`` tells the caller what went wrong without parsing text: ``connect``
(no daemon at that path, or it refused the connection), ``denied`` (the socket's
permissions keep this user out: not root, not in the vfiod group), ``protocol`` (the daemon sent
something that is not a response), ``api`` (the daemon answered with an error; ``code``
is its ``ApiErrorCode``), or ``fds`` (the fds to send with the request could not be sent:
one is not open).

``call(op, args, fds=[...])`` sends fds with the request line (SCM_RIGHTS, on the first
byte of the line): how a VMM hands its RAM over with ``attach`` (docs/architecture.md §8.1).
The caller keeps its fds; the daemon gets copies.
"""

from __future__ import annotations

import array
import errno
import itertools
import os
import socket
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from vfiod.api.schema import MAX_LINE, ApiError, ApiErrorCode, Request, Response
from vfiod.errors import ProtocolError, VfiodError

DEFAULT_SOCKET = "/run/vfiod/control.sock"


class ClientError(VfiodError):
    def __init__(self, kind: str, message: str, code: ApiErrorCode | None = None) -> None:
        self.kind = kind
        self.code = code
        self.message = message
        super().__init__(message)


class ControlClient:
    """One connection to the daemon; requests are answered in order."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float | None = 30.0) -> None:
        self.path = path
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._buf = b""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            kind = "denied" if e.errno in (errno.EACCES, errno.EPERM) else "connect"
            raise ClientError(kind, _connect_hint(path, e)) from None
        self.sock = sock

    def reopen(self) -> ControlClient:
        """A new connection to the same daemon (after an interrupted call left this one
        waiting for an answer nobody will read)."""
        return ControlClient(self.path, self._timeout)

    def call(self, op: str, args: dict[str, Any] | None = None,
             fds: Sequence[int] = ()) -> dict[str, Any]:
        """Send one request (with ``fds`` beside it, if any) and return its result;
        ``ClientError`` on any failure."""
        rid = next(self._ids)
        line = Request(op, dict(args or {}), rid).encode()
        if fds:
            self._send_with_fds(line, fds)
        else:
            self.send_raw(line)
        resp = self.read_response()
        if resp.id != rid and resp.id is not None:
            raise ClientError("protocol", f"daemon answered request {resp.id}, expected {rid}")
        if not resp.ok:
            err = resp.error or ApiError(ApiErrorCode.FAILED, "no error given")
            raise ClientError("api", err.message, err.code)
        return resp.result or {}

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (tests use it to send malformed lines)."""
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise self._lost(e) from None

    def _lost(self, e: OSError) -> ClientError:
        """A send failed. The daemon may have answered and hung up before reading (it
        refuses a peer at once): its answer says why, which beats "broken pipe"."""
        try:
            resp = self.read_response()
        except ClientError:
            resp = None
        if resp is not None and not resp.ok and resp.error is not None:
            return ClientError("api", resp.error.message, resp.error.code)
        return ClientError("connect", f"lost the daemon at {self.path}: "
                           f"{errno.errorcode.get(e.errno or 0, e)}")

    def _send_with_fds(self, data: bytes, fds: Sequence[int]) -> None:
        """The fds go with the line's first byte; the rest follows as plain bytes."""
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            sent = self.sock.sendmsg([data[:1]], rights)
        except OSError as e:
            if e.errno == errno.EBADF:
                bad = [fd for fd in fds if not _is_open(fd)]
                raise ClientError("fds", f"cannot send fds {list(fds)}: fd(s) {bad} are not "
                                  "open") from None
            raise self._lost(e) from None
        self.send_raw(data[sent:])

    def read_response(self) -> Response:
        line = self._read_line()
        try:
            return Response.decode(line)
        except ProtocolError as e:
            raise ClientError("protocol", str(e)) from None

    def _read_line(self) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise ClientError("protocol", "daemon sent a line longer than "
                                  f"{MAX_LINE} bytes")
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise ClientError("connect", f"no answer from the daemon at {self.path} "
                                  "within the timeout") from None
            except OSError as e:
                raise ClientError("connect", f"lost the daemon at {self.path}: "
                                  f"{errno.errorcode.get(e.errno or 0, e)}") from None
            if not chunk:
                raise ClientError("connect", f"the daemon at {self.path} closed the "
                                  "connection without answering")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _connect_hint(path: str, e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, str(e))
    if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
        return (f"cannot reach vfiod at {path}: {name} (is the daemon running? "
                "systemctl status vfiod; or pass --socket)")
    if e.errno in (errno.EACCES, errno.EPERM):
        who = os.geteuid()
        return (f"cannot reach vfiod at {path}: {name} (uid {who} may not open the socket; "
                "run as root or as a member of the vfiod group)")
    return f"cannot reach vfiod at {path}: {name}"
