"""A TLS peer's identities (``transport/peer_identity.py``): its certificate's subject CN and
DNS SANs, seen from both ends of a real mutual-TLS connection on loopback, with
certificates made by the ``openssl`` command at test time."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.unit.test_transport_tls import JOIN, _ca, _run, cfg
from vfiod.migration.transport import Connection, Listener, connect
from vfiod.migration.transport.peer_identity import certificate_identities, peer_identities


def _named_leaf(d: Path, name: str, subject: str, san: str) -> None:
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n"
                                   "extendedKeyUsage=serverAuth,clientAuth\n"
                                   "keyUsage=critical,digitalSignature\n")
    _run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d)
    _run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
         cwd=d)


@pytest.fixture(scope="module")
def named_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("named-pki")
    _ca(d, "ca")
    _named_leaf(d, "host-a", "/O=Example/CN=host-a",
                "IP:127.0.0.1,DNS:host-a.example,DNS:host-a,email:ops@example.com")
    _named_leaf(d, "host-b", "/O=Example",    # no CN: the DNS SANs alone
                "IP:127.0.0.1,DNS:host-b.example,URI:spiffe://example/b")
    return d


def _identities_both_ways(pki: Path, server: str, client: str
                          ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(what the server sees of the client, what the client sees of the server)."""
    seen: dict[str, tuple[str, ...]] = {}
    with Listener("127.0.0.1", 0, tls=cfg(pki, server)) as lst:
        def serve() -> None:
            with lst.accept(timeout=JOIN) as conn:
                seen["server"] = peer_identities(conn)
                conn.receive_control(JOIN)     # until the client closes
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with connect("127.0.0.1", lst.address[1], tls=cfg(pki, client)) as conn:
            seen["client"] = peer_identities(conn)
        t.join(JOIN)
        assert not t.is_alive()
    return seen["server"], seen["client"]


def test_both_ends_see_the_peers_cn_and_dns_names(named_pki: Path) -> None:
    of_client, of_server = _identities_both_ways(named_pki, "host-b", "host-a")
    # IP, e-mail and URI names are not identities; a name in both CN and SAN counts once.
    assert of_client == ("host-a", "host-a.example")
    assert of_server == ("host-b.example",)


def test_a_plain_tcp_peer_has_no_identity() -> None:
    with Listener("127.0.0.1", 0) as lst:
        conns: list[Connection] = []
        t = threading.Thread(target=lambda: conns.append(lst.accept(timeout=JOIN)),
                             daemon=True)
        t.start()
        with connect("127.0.0.1", lst.address[1]) as conn:
            t.join(JOIN)
            assert peer_identities(conn) == () and conn.peer_certificate() is None
            assert peer_identities(conns[0]) == ()
        conns[0].close()


def test_identities_of_a_getpeercert_dict() -> None:
    cert = {"subject": ((("countryName", "DE"),), (("commonName", "Host-C"),)),
            "subjectAltName": (("DNS", "Host-C"), ("DNS", "c.example"),
                               ("IP Address", "10.0.0.3"))}
    assert certificate_identities(cert) == ("Host-C", "c.example")
    assert certificate_identities({}) == () and certificate_identities(None) == ()
