"""Which peers may migrate a guest with this host: the TLS allow-list, and the warning
that a plain TCP link is not authenticated (docs/protocol.md §2, docs/architecture.md §5).

With ``[migration.tls]`` the handshake already proved that the peer holds a certificate
signed by the configured CA. The allow-list narrows that to named hosts: a guest's
``allow_peers`` when it sets one, else ``[migration.tls] allow``; with neither, any peer
the CA certified is allowed (``ctl check`` says so). A peer is allowed when one of its
certificate's identities (subject CN or a DNS SAN, ``transport/peer_identity.py``)
equals a listed name, compared without regard to case as DNS names are. The destination
checks the source before it admits a migration or answers an outcome query; the source
checks the destination before it sends its offer.

Without TLS nothing proves who the peer is: each migration logs that its link is
unauthenticated, and ``ctl check`` carries it as a note (``link_notes``).
"""

from __future__ import annotations

import logging

from vfiod.daemon.config import GuestConfig, MigrationConfig
from vfiod.migration.transport.peer_identity import peer_identities
from vfiod.migration.transport.tcp import Connection

log = logging.getLogger("vfiod.peer_auth")


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
