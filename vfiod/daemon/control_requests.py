"""Control requests answered on a worker thread (docs/architecture.md §6, §8.1).

``answer_line``: one request line → its response: decode,
validate the arguments, tie the fds that came with it to an ``attach`` (any other request
carrying fds is refused), run it. A handler that raises anything but ``ApiError`` is a
daemon bug: the client gets ``internal`` with the exception's type and text, the
traceback goes to the log, and the daemon keeps serving. ``answer_requests`` sends the
answers of a connection's request and of any line pipelined behind it, in order, closes
the fds each came with, and reads on for ``LINGER_S`` for the next; ``answer_too_large`` the error of a line over
``MAX_LINE``, after which the connection is closed.
"""

from __future__ import annotations

import dataclasses
import logging
import select
import time
from collections.abc import Callable
from typing import Any

from vfiod.api.ops import FD_OPS, MAX_FDS, Args, AttachArgs, parse_args
from vfiod.api.schema import MAX_LINE, ApiError, ApiErrorCode, Request, RequestError, Response
from vfiod.daemon.control_conn import ControlConn, RequestLine
from vfiod.daemon.received_fds import close_received

log = logging.getLogger("vfiod.control")

#: Runs one validated request; returns the result object or raises ApiError.
Dispatch = Callable[[str, Args], dict[str, Any]]
#: How long a worker keeps reading a connection after answering it before the loop takes
#: it back: a client that asks again within it (a load generator, ``ctl watch``) is read
#: on the same thread, and ``ctl status``'s close is seen there (README "Limits").
LINGER_S = 0.1


def answer_line(dispatch: Dispatch, line: bytes, fds: tuple[int, ...] = (),
                cut: bool = False) -> Response:
    """One request line (with the fds that came with it) → its response (never raises;
    the caller closes the fds)."""
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
        return Response.success(req.id, dispatch(req.op, args))
    except ApiError as e:
        return Response.failure(req.id, e)
    except Exception as e:  # noqa: BLE001 - a handler bug must not kill the server
        log.exception("control: %s failed", req.op)
        return Response.failure(req.id, ApiError(
            ApiErrorCode.INTERNAL, f"{req.op}: internal error: {type(e).__name__}: {e}"))


def answer_requests(c: ControlConn, req: RequestLine | None, dispatch: Dispatch,
                    idle_timeout: float, on_request: Callable[[bool], None],
                    room_wanted: int, linger_s: float = LINGER_S) -> bool:
    """Answer ``req`` and every complete line behind it, then keep reading the
    connection for ``linger_s`` after each answer and answer what comes (an active
    client's next request costs no hand-over between threads). False if the client went
    away (or did not read its answers within ``idle_timeout``); True when it was quiet
    for ``linger_s``, or a newcomer needs a place (``room_wanted``, an fd readable while
    one waits) and it has no partial line, or it sent a line too long for a request: the
    loop takes it back. Leaves the socket non-blocking and ``c.answered_at`` at the last
    answer."""
    try:
        while True:
            c.sock.settimeout(idle_timeout)     # a client that never reads is dropped
            while req is not None:
                try:
                    resp = answer_line(dispatch, req.line, req.fds, req.cut)
                finally:
                    for fd in req.fds:
                        close_received(fd)
                on_request(resp.ok)
                c.sock.sendall(resp.encode())
                c.answered_at = time.monotonic()
                req = c.next_line()
            quiet_at = c.answered_at + linger_s
            while req is None and len(c.buf) <= MAX_LINE:
                left = quiet_at - time.monotonic()
                if left <= 0:
                    c.sock.setblocking(False)
                    return True
                # poll, not select: a daemon's fds may be numbered past FD_SETSIZE
                watch = select.poll()
                watch.register(c.sock, select.POLLIN)
                if not c.buf:
                    watch.register(room_wanted, select.POLLIN)
                ready = {fd for fd, _ in watch.poll(left * 1000)}
                if c.sock.fileno() in ready:
                    if not c.read():
                        return False
                    req = c.next_line()
                elif ready:                     # idle, and somebody needs its place
                    c.sock.setblocking(False)
                    return True
            if req is None:                     # over MAX_LINE: the loop closes it
                c.sock.setblocking(False)
                return True
    except OSError:
        return False


def answer_too_large(c: ControlConn, idle_timeout: float,
                     on_request: Callable[[bool], None]) -> None:
    err = ApiError(ApiErrorCode.TOO_LARGE, f"request line exceeds {MAX_LINE} bytes; "
                   "closing the connection")
    on_request(False)
    try:
        c.sock.settimeout(idle_timeout)
        c.sock.sendall(Response.failure(None, err).encode())
    except OSError:
        pass
