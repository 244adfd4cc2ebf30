"""A loopback TCP connection as vfiod's transport wraps it, for the stream and RAM channel
tests (docs/protocol.md §12)."""

from __future__ import annotations

import socket

from vfiod.migration.transport.tcp import Connection


def loopback_pair() -> tuple[Connection, Connection]:
    """(source end, destination end), each with a 10 s I/O timeout."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
    return Connection(a, "src", io_timeout=10), Connection(b, "dst", io_timeout=10)
