"""RAM channels between two daemons (docs/protocol.md §12.2): the source dials its
channels to the peer's migration port with an offer of kind ``channel``; the destination's
accept loop hands each such connection to the session of the migration it names.

``ChannelRoutes.accepting(migration_id)`` registers a destination session's acceptor for
the time its session runs; ``deliver`` gives it a connection whose offer names that id
(ACK offer, then the session reads the CHANNEL record and checks the challenge), or
refuses the offer when no session of that id waits. The connection's own thread then
waits until that migration ends, so its connection is closed only after the session is
done with it. ``dialer`` makes the source's ``ChannelDialer``: each channel is a new
connection to the same peer, allowed and offered like the main one.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from vfiod.daemon.config import GuestConfig, MigrationConfig
from vfiod.daemon.offer import Offer, accept_offer, refuse_quietly, send_offer
from vfiod.daemon.peer_auth import connect_allowed
from vfiod.migration.session.channels import ChannelAcceptor, ChannelDialer
from vfiod.migration.session.link import ThrottledLink
from vfiod.migration.stream.header import MAX_CHANNELS
from vfiod.migration.transport import TlsConfig
from vfiod.migration.transport.channel_send import ChannelLink
from vfiod.migration.transport.control import TransportCode, TransportError
from vfiod.migration.transport.tcp import Connection

log = logging.getLogger("vfiod.migrations")

#: seconds a dialed channel waits for the peer's ACK offer
CHANNEL_OFFER_TIMEOUT_S = 30.0
#: channel connections one migration takes in at most (its channels, and strangers that
#: name its id but fail the challenge): each holds a thread until the migration ends
MAX_DELIVERIES = 2 * MAX_CHANNELS


class _Route:
    def __init__(self) -> None:
        self.conns: queue.Queue[Connection] = queue.Queue()
        self.done = threading.Event()
        self.delivered = 0

    def accept(self, timeout: float) -> Connection:
        try:
            return self.conns.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise TransportError(TransportCode.ACCEPT_TIMEOUT, "channels",
                                 f"no RAM channel connected within {timeout:g} s") from None


class ChannelRoutes:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, _Route] = {}

    @contextmanager
    def accepting(self, migration_id: str) -> Iterator[ChannelAcceptor]:
        route = _Route()
        with self._lock:
            self._routes[migration_id] = route
        try:
            yield route.accept
        finally:
            with self._lock:
                del self._routes[migration_id]
            route.done.set()
            while not route.conns.empty():     # offered, never taken: closed here
                route.conns.get_nowait().close()

    def deliver(self, conn: Connection, offer: Offer) -> None:
        """Hand ``conn`` to the session of ``offer.migration_id`` and hold it (this
        thread's caller closes it on return) until that migration ends."""
        with self._lock:
            route = self._routes.get(offer.migration_id[:64])   # as the ledger keeps ids
            full = route is not None and route.delivered >= MAX_DELIVERIES
            if route is not None and not full:
                route.delivered += 1
        if full:        # strangers guessing the id must not hold threads without bound
            refuse_quietly(conn, f"migration {offer.migration_id!r} has all its channels")
            return
        if route is None:
            log.warning("RAM channel from %s refused: no migration %r of guest %s waits "
                        "for channels", conn.peer, offer.migration_id, offer.guest)
            refuse_quietly(conn, f"no migration {offer.migration_id!r} waits for RAM "
                           "channels here")
            return
        log.info("migration %s: RAM channel connection from %s", offer.migration_id,
                 conn.peer)
        accept_offer(conn)
        route.conns.put(conn)
        route.done.wait()


class PacedChannel:
    """A channel connection paced to its share of ``[migration] bandwidth_limit``."""

    def __init__(self, conn: Connection, rate_bps: float) -> None:
        self.conn = conn
        self.paced = ThrottledLink(conn, rate_bps)

    def send_buffers(self, buffers: Sequence[Any]) -> None:
        self.paced.send_buffers(buffers)

    def shutdown(self) -> None:
        self.conn.shutdown()

    def close(self) -> None:
        self.paced.close()


def dialer(host: str, port: int, guest: GuestConfig, migration: MigrationConfig,
           tls: TlsConfig | None, migration_id: str) -> ChannelDialer:
    """The source's dialer: connect as for the main connection, offer kind ``channel``;
    with a bandwidth limit each of N channels gets 1/N of it (the main connection then
    carries no RAM)."""
    def dial(index: int, count: int) -> ChannelLink:
        conn = connect_allowed(host, port, guest, migration, tls)
        try:
            send_offer(conn, Offer(guest.name, migration_id, kind="channel"),
                       CHANNEL_OFFER_TIMEOUT_S)
        except BaseException:
            conn.close()
            raise
        bw = migration.bandwidth_limit
        return PacedChannel(conn, bw / count) if bw else conn
    return dial
