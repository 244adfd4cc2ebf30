"""The destination daemon's routing of RAM channel connections (docs/protocol.md §12.2,
``vfiod/daemon/channel_routes.py``): to the session of the migration they name, held
until it ends, refused when no migration waits or when it has taken in all it may."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.support.daemons import wait_until
from vfiod.daemon.channel_routes import MAX_DELIVERIES, ChannelRoutes
from vfiod.daemon.offer import Offer
from vfiod.migration.transport.control import ControlType, TransportError


class FakeConn:
    def __init__(self, n: int) -> None:
        self.peer = f"10.0.0.9:{n}"
        self.sent: list[Any] = []
        self.closed = False

    def send_control(self, msg: Any) -> None:
        self.sent.append(msg)

    def close(self) -> None:
        self.closed = True


def test_channels_reach_their_migration_and_are_held_until_it_ends() -> None:
    routes = ChannelRoutes()
    offer = Offer("g1", "m1", kind="channel")
    conns = [FakeConn(i) for i in range(MAX_DELIVERIES + 1)]
    threads = [threading.Thread(target=routes.deliver, args=(c, offer)) for c in conns[:-1]]
    with routes.accepting("m1") as accept:
        for t in threads:
            t.start()
        assert accept(5.0) in conns            # a delivered connection, ACKed
        wait_until(lambda: all(c.sent for c in conns[:-1]), 10, "every channel answered")
        assert {c.sent[0].kind for c in conns[:-1]} == {ControlType.ACK}
        routes.deliver(conns[-1], offer)       # one too many: refused at once
        assert conns[-1].sent[0].kind is ControlType.ERROR
        assert "has all its channels" in conns[-1].sent[0].fields["message"]
        assert all(t.is_alive() for t in threads)      # held while the migration runs
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert sum(c.closed for c in conns) == MAX_DELIVERIES - 1   # never taken: closed
    with pytest.raises(TransportError, match="no RAM channel connected within 0"):
        accept(0.0)


def test_a_channel_for_no_waiting_migration_is_refused() -> None:
    conn = FakeConn(1)
    ChannelRoutes().deliver(conn, Offer("g1", "nosuch", kind="channel"))
    assert conn.sent[0].kind is ControlType.ERROR
    assert "no migration 'nosuch' waits for RAM channels" in conn.sent[0].fields["message"]
