"""TCP transport with a return path and optional mutual TLS (docs/architecture.md §5).

One connection carries the stream source → destination and control messages destination →
source (``control.py``). Destination: ``Listener(host, port, tls=cfg).accept(timeout)``;
source: ``connect(host, port, tls=cfg, timeout=10)``; then ``StreamReader(conn)`` /
``StreamWriter(conn, header, ram)``, ``conn.send_control(ControlMessage.ack(stage))`` /
``conn.wait_ack(stage, timeout)``.

``Connection``: a ``StreamSink`` (``send_buffers``, ``check_peer``), a stream ``Source``
(``recv_into``), a TLS peer's certificate, and, for the downtime prediction, its unsent bytes
(``unsent_bytes``; ``ready_bytes`` 0: unpaced). Plain TCP: ``send_buffers`` hands the batch to
``socket.sendmsg`` (the kernel copies straight from the guest mmap), ``recv_into`` lands bytes
in the caller's view (guest memory for RAM); ``ssl`` has no ``sendmsg``, so TLS sends buffer by
buffer. Every failure is a ``TransportError`` with a ``TransportCode``: connect or accept
refused or timed out, no progress within ``io_timeout``, the peer closed or reset, TLS failure,
a malformed control frame, the destination's CANCEL or ERROR. Each end runs its side from one
thread (the source polls the return path between batches): one TLS object is never used by two
threads at once. ``Listener.accept_raw`` leaves the TLS handshake to the connection's own
thread under its own deadline (``Accepted.handshake``; ``Accepted.abort`` wakes it): a stalled
peer delays nobody else.
"""

from __future__ import annotations

import errno as _errno
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vfiod.kernel.linux import socket_unsent_bytes
from vfiod.migration.transport.control import (
    AckStage,
    ControlMessage,
    ControlParser,
    ControlType,
    TransportCode,
    TransportError,
)

_MAX_IOV = 1024
DEFAULT_IO_TIMEOUT = 120.0


@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS: this end's certificate and key, and the CA that signs the peers';
    ``server_hostname``, the name the source checks in the destination's certificate
    (default: the host it connects to, so an IP address needs an IP SAN)."""

    certfile: str
    keyfile: str
    cafile: str
    server_hostname: str | None = None

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._common(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: the source must present a certificate
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server and its name
        self._common(ctx)
        return ctx

    def _common(self, ctx: ssl.SSLContext) -> None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.certfile, self.keyfile)
        ctx.load_verify_locations(cafile=self.cafile)


def _peer_name(addr: Any) -> str:
    if isinstance(addr, tuple):
        host = f"[{addr[0]}]" if ":" in str(addr[0]) else str(addr[0])
        return f"{host}:{addr[1]}"
    return str(addr)


def _errno_name(e: OSError) -> str:
    if isinstance(e, socket.gaierror):      # EAI_* codes are not errno values
        return f"cannot resolve the host: {e.strerror}"
    return _errno.errorcode.get(e.errno or 0, str(e.errno))


class Connection:
    def __init__(self, sock: socket.socket, peer: str, *,
                 io_timeout: float | None = DEFAULT_IO_TIMEOUT) -> None:
        self._sock = sock
        self.peer = peer
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._io_timeout = io_timeout
        sock.settimeout(io_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # acks must not wait
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._parser = ControlParser(peer)
        self.acks: deque[ControlMessage] = deque()
        self._closed_by_peer = False
        self.bytes_sent = self.bytes_received = 0

    # -- StreamSink ------------------------------------------------------------------------
    def send_buffers(self, buffers: Sequence[Any]) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        try:
            if self.tls:
                for v in views:
                    self._sock.sendall(v)
                    self.bytes_sent += len(v)
                return
            i = 0
            while i < len(views):
                n = self._sock.sendmsg(views[i:i + _MAX_IOV], [], socket.MSG_NOSIGNAL)
                self.bytes_sent += n
                while n > 0:  # advance over what the kernel took (may end mid-buffer)
                    if n >= len(views[i]):
                        n -= len(views[i])
                        i += 1
                    else:
                        views[i] = views[i][n:]
                        n = 0
                while i < len(views) and not len(views[i]):
                    i += 1
        except OSError as e:
            raise self._wrap(e, "send") from None

    def unsent_bytes(self) -> int:      # not yet acknowledged by the destination's kernel
        return socket_unsent_bytes(self._sock.fileno())

    def ready_bytes(self) -> int:       # not paced: its bandwidth estimate is the wire's
        return 0

    def peer_certificate(self) -> dict[str, Any] | None:  # the TLS peer's; None on TCP
        return self._sock.getpeercert() if isinstance(self._sock, ssl.SSLSocket) else None

    @property
    def io_timeout(self) -> float | None:
        return self._io_timeout

    def set_io_timeout(self, seconds: float | None) -> None:
        """Seconds any one send or receive may block (None: forever)."""
        self._io_timeout = seconds
        self._sock.settimeout(seconds)

    def check_peer(self) -> None:
        """Read whatever the destination sent back; raise on CANCEL, ERROR or close."""
        for msg in self._poll(0.0):
            self._raise_if_fatal(msg)
            self.acks.append(msg)
        if self._closed_by_peer:
            raise TransportError(TransportCode.PEER_CLOSED, self.peer,
                                 "the destination closed the connection")

    def wait_ack(self, stage: AckStage, timeout: float) -> ControlMessage:
        """Block until ACK(``stage``) arrives (other messages are kept in ``acks``)."""
        return self._wait_for(lambda m: m.stage is stage,
                              f"{stage.value!r} acknowledgement", timeout)

    def wait_control(self, kind: ControlType, timeout: float) -> ControlMessage:
        """Destination: block until the source's frame of ``kind`` (DIGESTS, REPORT)
        arrives."""
        return self._wait_for(lambda m: m.kind is kind, f"{kind.name} frame", timeout)

    def _wait_for(self, wanted: Callable[[ControlMessage], bool], what: str,
                  timeout: float) -> ControlMessage:
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.acks):
                if wanted(m):
                    del self.acks[i]
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(TransportCode.TIMEOUT, self.peer,
                                     f"no {what} within {timeout:g} s")
            for msg in self._poll(left):
                self._raise_if_fatal(msg)
                self.acks.append(msg)
            if self._closed_by_peer and not any(wanted(m) for m in self.acks):
                raise TransportError(TransportCode.PEER_CLOSED, self.peer,
                                     f"the peer closed before sending its {what}")

    # -- stream Source ---------------------------------------------------------------------
    def recv_into(self, view: memoryview) -> int:
        try:
            n = self._sock.recv_into(view)
        except ssl.SSLEOFError:
            return 0  # a TLS peer that vanished without close_notify: end of stream
        except OSError as e:
            raise self._wrap(e, "receive") from None
        self.bytes_received += n
        return n

    # -- return path -----------------------------------------------------------------------
    def send_control(self, msg: ControlMessage) -> None:
        self.send_buffers([msg.encode()])

    def receive_control(self, timeout: float) -> list[ControlMessage]:
        """Control messages that arrive within ``timeout`` seconds (possibly none)."""
        return self._poll(timeout)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def shutdown(self) -> None:
        """Wake a thread blocked on this connection (a RAM channel's): it sees it end."""
        try:
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------
    def _poll(self, timeout: float) -> list[ControlMessage]:
        if self._closed_by_peer:
            return []
        pending = self._sock.pending() if isinstance(self._sock, ssl.SSLSocket) else 0
        if not pending:
            ready, _, _ = select.select([self._sock], [], [], max(timeout, 0.0))
            if not ready:
                return []
        # Readable does not mean a whole message (TLS: it may be a session ticket or part of
        # a record), so read without blocking and keep what came for the next poll.
        try:
            if self.tls:
                self._sock.setblocking(False)
                try:
                    data = self._sock.recv(65536)
                finally:
                    self._sock.settimeout(self._io_timeout)
            else:
                data = self._sock.recv(65536, socket.MSG_DONTWAIT)
        except (ssl.SSLWantReadError, BlockingIOError):
            return []
        except ssl.SSLEOFError:
            data = b""
        except OSError as e:
            raise self._wrap(e, "receive control") from None
        if not data:
            self._closed_by_peer = True
            return []
        return self._parser.feed(data)

    def _raise_if_fatal(self, msg: ControlMessage) -> None:
        if msg.kind == ControlType.CANCEL:
            raise TransportError(TransportCode.PEER_CANCELLED, self.peer,
                                 f"the peer cancelled: {msg.fields.get('reason', '')}",
                                 remote=msg.fields)
        if msg.kind == ControlType.ERROR:
            raise TransportError(TransportCode.PEER_ERROR, self.peer,
                                 f"the destination failed: {msg.fields.get('code', '?')}: "
                                 f"{msg.fields.get('message', '')}", remote=msg.fields)

    def _wrap(self, e: OSError, what: str) -> TransportError:
        if isinstance(e, socket.timeout):
            return TransportError(TransportCode.TIMEOUT, self.peer,
                                  f"{what}: no progress within {self._sock.gettimeout()} s")
        if isinstance(e, ssl.SSLError):
            return TransportError(TransportCode.TLS, self.peer, f"{what}: TLS error: "
                                  f"{e.reason or e}")
        if isinstance(e, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
            return TransportError(TransportCode.PEER_CLOSED, self.peer,
                                  f"{what}: the peer closed the connection "
                                  f"({_errno_name(e)})", errno=e.errno)
        return TransportError(TransportCode.IO, self.peer, f"{what}: {_errno_name(e)}",
                              errno=e.errno)


class Accepted:
    """An accepted connection whose TLS handshake (if any) has not run yet."""

    def __init__(self, sock: socket.socket, peer: str, ctx: ssl.SSLContext | None,
                 io_timeout: float | None) -> None:
        self._sock = sock
        self.peer = peer
        self._ctx = ctx
        self._io_timeout = io_timeout
        # abort() vs the handshake's socket swap and close(): shut this fd, never a reused one
        self._lock = threading.Lock()
        self._aborted = self._closed = False

    def handshake(self, timeout: float | None) -> Connection:
        """The connection, after the TLS handshake within ``timeout`` on TLS."""
        if self._ctx is None:
            return Connection(self._sock, self.peer, io_timeout=self._io_timeout)
        try:
            with self._lock:
                if self._aborted:
                    raise ConnectionAbortedError(_errno.ECONNABORTED, "aborted")
                self._sock.settimeout(timeout)
                sock = self._sock = self._ctx.wrap_socket(
                    self._sock, server_side=True, do_handshake_on_connect=False)
            sock.do_handshake()
        except (ssl.SSLError, OSError) as e:
            self.close()
            reason = "no handshake within the deadline" if isinstance(e, TimeoutError) \
                else getattr(e, "reason", None) or str(e)
            raise TransportError(TransportCode.TLS, self.peer,
                                 f"TLS handshake failed: {reason}") from None
        return Connection(sock, self.peer, io_timeout=self._io_timeout)

    def abort(self) -> None:
        """Wake the thread blocked in the handshake or a receive: it sees the connection end.
        A plain socket shutdown even under TLS (``SSLSocket.shutdown`` drops the TLS object)."""
        with self._lock:
            self._aborted = True
            if self._closed:
                return
            try:
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._sock.close()


class Listener:
    """A listening socket for one incoming migration at a time."""

    def __init__(self, host: str, port: int = 0, *, tls: TlsConfig | None = None,
                 backlog: int = 4, io_timeout: float | None = DEFAULT_IO_TIMEOUT) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
            self._sock.listen(backlog)
        except OSError as e:
            self._sock.close()
            raise TransportError(TransportCode.IO, f"{host}:{port}",
                                 f"listen: {_errno_name(e)}", errno=e.errno) from None
        self._ctx = tls.server_context() if tls else None
        self._io_timeout = io_timeout
        self.address: tuple[str, int] = self._sock.getsockname()[:2]

    def accept(self, timeout: float | None) -> Connection:
        """The next connection, its TLS handshake done (both within ``timeout``)."""
        return self.accept_raw(timeout).handshake(timeout)

    def accept_raw(self, timeout: float | None) -> Accepted:
        """The next connection, before its TLS handshake."""
        self._sock.settimeout(timeout)
        here = _peer_name(self.address)
        try:
            sock, addr = self._sock.accept()
        except TimeoutError:
            raise TransportError(TransportCode.ACCEPT_TIMEOUT, here,
                                 f"no source connected within {timeout:g} s") from None
        except OSError as e:
            raise TransportError(TransportCode.IO, here, f"accept: {_errno_name(e)}",
                                 errno=e.errno) from None
        return Accepted(sock, _peer_name(addr), self._ctx, self._io_timeout)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(host: str, port: int, *, tls: TlsConfig | None = None, timeout: float = 10.0,
            io_timeout: float | None = DEFAULT_IO_TIMEOUT) -> Connection:
    """Connect to a destination (TLS handshake included in ``timeout``)."""
    peer = _peer_name((host, port))
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise TransportError(TransportCode.CONNECT_TIMEOUT, peer,
                             f"connect: no answer within {timeout:g} s") from None
    except OSError as e:
        raise TransportError(TransportCode.CONNECT, peer, f"connect: {_errno_name(e)}",
                             errno=e.errno) from None
    if tls is not None:
        ctx = tls.client_context()
        try:
            sock = ctx.wrap_socket(sock, server_hostname=tls.server_hostname or host)
        except (ssl.SSLError, OSError) as e:
            sock.close()
            reason = getattr(e, "reason", None) or str(e)
            raise TransportError(TransportCode.TLS, peer,
                                 f"TLS handshake failed: {reason}") from None
    return Connection(sock, peer, io_timeout=io_timeout)
