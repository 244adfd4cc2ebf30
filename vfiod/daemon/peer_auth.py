"""Which peers may migrate a guest with this host: the TLS allow-list, and the warning
that a plain TCP link is not authenticated (docs/protocol.md §2, docs/architecture.md §5).

With ``[migration.tls]`` the handshake already proved that the peer holds a certificate
signed by the configured CA. The allow-list narrows that to named hosts: a guest's
``allow_peers`` when it sets one, else ``[migration.tls] allow``; with neither, any peer
the CA certified is allowed (``ctl check`` says so). A peer is allowed when one of its
certificate's identities (subject CN or a DNS SAN, ``transport/peer_identity.py``)
equals a listed name, compared without regard to case as DNS names are. The destination
checks the source before it admits a migration or answers an outcome query
(``refused_peer``: the source gets the reason as the offer's refusal); the source checks
the destination before it sends its offer (``connect_allowed``).

Without TLS nothing proves who the peer is: each migration logs that its link is
unauthenticated, and ``ctl check`` carries it as a note (``link_notes``).
"""

from __future__ import annotations

import logging

from vfiod.daemon.config import GuestConfig, MigrationConfig
from vfiod.daemon.offer import refuse_quietly
from vfiod.daemon.registry import GuestEntry
from vfiod.migration.transport.control import TransportCode, TransportError
from vfiod.migration.transport.peer_identity import peer_identities
from vfiod.migration.transport.tcp import Connection, TlsConfig, connect

log = logging.getLogger("vfiod.peer_auth")

#: the source's connect to a destination, TLS handshake included
CONNECT_TIMEOUT_S = 10.0


def allowed_peers(guest: GuestConfig | None, migration: MigrationConfig
                  ) -> tuple[tuple[str, ...], str]:
    """The allow-list that applies to ``guest`` (``()``: any peer the CA signed) and where
    it comes from, for messages."""
    if guest is not None and guest.allow_peers is not None:
        return guest.allow_peers, f"guest {guest.name} allow_peers"
    return migration.allow_peers, "[migration.tls] allow"


def refusal(conn: Connection, guest: GuestConfig | None, migration: MigrationConfig,
            link: str | None = None) -> str | None:
    """None if ``conn``'s peer may migrate ``guest`` here, else why not (naming the
    identities seen and the list). ``link`` ("from" or "to"), for a migration rather
    than a query: a plain TCP link is logged as unauthenticated, once per call."""
    if not conn.tls:
        if link is not None:
            log.warning("migration link %s %s is not authenticated: plain TCP", link,
                        conn.peer)
        return None
    allow, where = allowed_peers(guest, migration)
    if not allow:
        return None
    seen = peer_identities(conn)
    wanted = {name.casefold() for name in allow}
    if any(name.casefold() in wanted for name in seen):
        return None
    names = ", ".join(seen) if seen else "no name (no CN, no DNS SAN)"
    return (f"TLS peer {conn.peer} is not on the allow-list: its certificate names "
            f"{names}; {where} is {', '.join(allow)}")


def link_notes(guest: GuestConfig, migration: MigrationConfig) -> list[str]:
    """What ``ctl check GUEST`` says about who may migrate it."""
    if migration.tls is None:
        return ["migration link is not authenticated: plain TCP (any host that reaches "
                "the migration port can offer a stream; configure [migration.tls])"]
    allow, where = allowed_peers(guest, migration)
    if not allow:
        return ["TLS: any peer certified by the CA (no allow-list: set "
                "[migration.tls] allow or the guest's allow_peers to name the hosts)"]
    return [f"TLS: peers allowed by {where}: {', '.join(allow)}"]


def refused_peer(conn: Connection, entry: GuestEntry | None, migration: MigrationConfig,
                 kind: str) -> bool:
    """Destination, after the offer (``kind`` "migrate", "channel" or "query") for ``entry`` (None: no
    such guest here, the global list applies): refuse a peer that is not allowed, telling
    it why; True if refused. A migration over plain TCP is logged as unauthenticated."""
    why = refusal(conn, entry.config if entry is not None else None, migration,
                  "from" if kind in ("migrate", "channel") else None)
    if why is None:
        return False
    log.warning("incoming %s from %s refused: %s", kind, conn.peer, why)
    refuse_quietly(conn, why)
    return True


def connect_allowed(host: str, port: int, guest: GuestConfig, migration: MigrationConfig,
                    tls: TlsConfig | None, timeout: float = CONNECT_TIMEOUT_S) -> Connection:
    """Source: connect to a destination allowed to receive ``guest``; a ``TransportError``
    (code ``tls``) naming its identities and the list if it is not."""
    conn = connect(host, port, tls=tls, timeout=timeout)
    conn.set_io_timeout(migration.io_timeout_s)
    why = refusal(conn, guest, migration, "to")
    if why is not None:
        conn.close()
        raise TransportError(TransportCode.TLS, conn.peer, "this host does not allow that "
                             f"destination: {why}")
    return conn
