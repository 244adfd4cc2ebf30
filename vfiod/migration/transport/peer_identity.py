"""Who a TLS peer is: the names its verified certificate claims (docs/architecture.md §5;
the allow-list that uses them: docs/protocol.md §2).

A peer's identities are its certificate's subject common name (CN) and every DNS name in
its subjectAltName, in that order, without repeats. IP addresses, e-mail and URI names
are not identities: an allow-list names hosts, and an address can move between them.
The certificate is the one the handshake verified against the configured CA (both ends
require one, ``TlsConfig``), so what this returns is what the CA vouched for. A plain TCP
connection has no identity: ``()``.
"""

from __future__ import annotations

from typing import Any

from vfiod.migration.transport.tcp import Connection


def certificate_identities(cert: dict[str, Any] | None) -> tuple[str, ...]:
    """The CN and DNS SANs of a certificate in ``ssl.SSLSocket.getpeercert()`` form."""
    if not cert:
        return ()
    names: list[str] = []
    # subject: a tuple of relative distinguished names, each a tuple of (attribute, value)
    for rdn in cert.get("subject", ()):
        names += [value for attribute, value in rdn if attribute == "commonName"]
    names += [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    return tuple(dict.fromkeys(names))


def peer_identities(conn: Connection) -> tuple[str, ...]:
    """The identities of ``conn``'s TLS peer; ``()`` on plain TCP."""
    return certificate_identities(conn.peer_certificate())
