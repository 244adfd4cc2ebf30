"""Mutual TLS on loopback, with a throwaway CA made by the ``openssl`` command at test time."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from vfiod.migration.stream import (
    Complete,
    GuestRam,
    StreamHeader,
    StreamReader,
    StreamWriter,
)
from vfiod.migration.transport import (
    AckStage,
    ControlMessage,
    Listener,
    TlsConfig,
    TransportCode,
    TransportError,
    connect,
)
from vfiod.vfio import RamRegion

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(
    OPENSSL is None, reason="needs the openssl command line tool to make test certificates "
    "(Debian package 'openssl')")

PS = 4096
REGIONS = (RamRegion("ram", 0, 64 * PS),)
HEADER = StreamHeader("src", "m", "g", PS, REGIONS, ())
JOIN = 30.0


def _run(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL or "openssl", *args], cwd=cwd, check=True, capture_output=True,
                   timeout=60)


def _ca(d: Path, name: str) -> None:
    _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
         "-days", "2", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(d: Path, name: str, ca: str, usage: str) -> None:
    (d / f"{name}.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        f"extendedKeyUsage={usage}\n"
        "keyUsage=critical,digitalSignature\n"
        "authorityKeyIdentifier=keyid\n")
    _run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
         "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
         cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "dest", "ca", "serverAuth")
    _leaf(d, "src", "ca", "clientAuth")
    _leaf(d, "intruder", "rogue-ca", "clientAuth")
    return d


def cfg(d: Path, who: str, ca: str = "ca", **kw: Any) -> TlsConfig:
    return TlsConfig(str(d / f"{who}.pem"), str(d / f"{who}.key"), str(d / f"{ca}.pem"), **kw)


class Server:
    def __init__(self, tls: TlsConfig, fn: Any) -> None:
        self.lst = Listener("127.0.0.1", 0, tls=tls)
        self.error: BaseException | None = None
        self.result: Any = None
        self._fn = fn
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            with self.lst.accept(timeout=JOIN) as conn:
                assert conn.tls
                self.result = self._fn(conn)
        except BaseException as e:  # noqa: BLE001
            self.error = e
        finally:
            self.lst.close()

    def join(self) -> None:
        self._t.join(JOIN)
        assert not self._t.is_alive()


def receive(conn: Any) -> bytearray:
    r = StreamReader(conn)
    h = r.read_header()
    dst = bytearray(h.regions[0].size)
    r.attach_ram(GuestRam(PS, h.regions, [dst], writable=True))
    for ev in r.events():
        if isinstance(ev, Complete):
            conn.send_control(ControlMessage.ack(AckStage.RESUMED))
    return dst


def test_mutual_tls_stream_round_trip(pki: Path) -> None:
    src = bytearray(bytes(range(256)) * (REGIONS[0].size // 256))
    srv = Server(cfg(pki, "dest"), receive)
    with connect("127.0.0.1", srv.lst.address[1], tls=cfg(pki, "src")) as conn:
        w = StreamWriter(conn, HEADER, GuestRam(PS, REGIONS, [src]), record_bytes=8 * PS)
        w.start()
        w.send_ram([(0, 64)], quiescent=False)
        w.finish()
        conn.wait_ack(AckStage.RESUMED, timeout=JOIN)
    srv.join()
    assert srv.error is None and srv.result == src


def test_a_source_without_a_certificate_is_refused(pki: Path) -> None:
    srv = Server(cfg(pki, "dest"), receive)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts the CA, presents no certificate
    ctx.load_verify_locations(cafile=str(pki / "ca.pem"))
    raw = socket.create_connection(("127.0.0.1", srv.lst.address[1]), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
            s.recv(1)  # TLS 1.3: the server's refusal arrives after the client's handshake
    srv.join()
    assert isinstance(srv.error, TransportError) and srv.error.code == TransportCode.TLS
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(srv.error)


def test_a_certificate_from_another_ca_is_refused(pki: Path) -> None:
    srv = Server(cfg(pki, "dest"), receive)
    try:
        conn = connect("127.0.0.1", srv.lst.address[1], tls=cfg(pki, "intruder"))
        conn.receive_control(5.0)  # the server's alert arrives here under TLS 1.3
        conn.close()
    except TransportError as e:
        assert e.code in (TransportCode.TLS, TransportCode.PEER_CLOSED)
    srv.join()
    assert isinstance(srv.error, TransportError) and srv.error.code == TransportCode.TLS
    assert "certificate" in str(srv.error).lower()


def test_the_source_checks_the_destination_name(pki: Path) -> None:
    srv = Server(cfg(pki, "dest"), receive)
    with pytest.raises(TransportError) as ei:
        connect("127.0.0.1", srv.lst.address[1],
                tls=cfg(pki, "src", server_hostname="other.example"))
    assert ei.value.code == TransportCode.TLS
    assert "CERTIFICATE_VERIFY_FAILED" in str(ei.value)
    srv.join()


def test_the_source_refuses_a_destination_signed_by_another_ca(pki: Path) -> None:
    srv = Server(cfg(pki, "dest"), receive)
    with pytest.raises(TransportError) as ei:
        connect("127.0.0.1", srv.lst.address[1], tls=cfg(pki, "src", ca="rogue-ca"))
    assert ei.value.code == TransportCode.TLS
    srv.join()
