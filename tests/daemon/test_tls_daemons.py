"""Two daemons configured with ``[migration.tls]`` (docs/architecture.md §5: mutual TLS, stdlib ssl):
the migration goes through when both hosts' certificates come from the configured CA, and
fails cleanly, with the source still running, when the destination's does not."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon_configs import host_config
from tests.support.daemons import DaemonProcess, guest_status

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command to make "
                                "test certificates (Debian package openssl)")


def _openssl(d: Path, *args: str) -> None:
    subprocess.run([str(OPENSSL), *args], cwd=d, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, ca: str) -> None:
    _openssl(d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-subj", f"/CN={ca}", "-days", "2", "-keyout", f"{ca}.key",
             "-out", f"{ca}.pem", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign")


def _make_host(d: Path, host: str, ca: str) -> None:
    """A host certificate usable both ways (a vfiod is a source and a destination)."""
    (d / f"{host}.ext").write_text("subjectAltName=IP:127.0.0.1\n"
                                   "extendedKeyUsage=serverAuth,clientAuth\n"
                                   "keyUsage=critical,digitalSignature\n")
    _openssl(d, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", f"/CN={host}", "-keyout", f"{host}.key", "-out", f"{host}.csr")
    _openssl(d, "x509", "-req", "-in", f"{host}.csr", "-CA", f"{ca}.pem", "-CAkey",
             f"{ca}.key", "-CAcreateserial", "-days", "2", "-extfile", f"{host}.ext",
             "-out", f"{host}.pem")


def _tls(d: Path, host: str) -> str:
    return (f'[migration.tls]\ncert = "{d}/{host}.pem"\nkey = "{d}/{host}.key"\n'
            f'ca = "{d}/ca.pem"\n')


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "rogue")
    _make_host(d, "src", "ca")
    _make_host(d, "dst", "ca")
    _make_host(d, "impostor", "rogue")
    return d


def _with_tls(config: str, tls: str) -> str:
    # [migration.tls] must follow the [migration] table's own keys.
    head, sep, rest = config.partition("\n[[guest]]")
    return head + tls + sep + rest


@pytest.fixture(scope="module")
def daemons(pki: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess, DaemonProcess]]:
    src = DaemonProcess(_with_tls(host_config("source"), _tls(pki, "src")), "tls-src")
    dst = DaemonProcess(_with_tls(host_config("destination"), _tls(pki, "dst")), "tls-dst")
    bad = DaemonProcess(_with_tls(host_config("destination"), _tls(pki, "impostor")),
                        "tls-bad")
    try:
        for d in (src, dst, bad):
            d.wait_ready()
        yield src, dst, bad
    finally:
        for d in (src, dst, bad):
            d.cleanup()


def test_untrusted_destination_is_refused(daemons: tuple[DaemonProcess, ...]) -> None:
    src, _, bad = daemons
    r = src.ctl("migrate", "g1", "--to", bad.migration_address, "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])["migration"]
    assert m["result"] == "failed" and "TLS handshake failed" in m["error"], m
    g = guest_status(src, "g1")
    assert g["state"] == "running"
    assert {d["state_label"] for d in g["devices"]} == {"RUNNING"}


def test_migration_over_mutual_tls(daemons: tuple[DaemonProcess, ...]) -> None:
    src, dst, _ = daemons
    r = src.ctl("migrate", "g1", "--to", dst.migration_address, "--timeout", "60",
                "--on-timeout", "force", "--json")
    assert r.returncode == 0, r.stdout + r.stderr + src.log() + dst.log()
    m = json.loads(r.stdout.strip().splitlines()[-1])["migration"]
    assert m["result"] == "completed" and m["verified"] is True
    assert guest_status(dst, "g1")["state"] == "running"



def test_migration_over_tls_ram_channels(pki: Path) -> None:
    """RAM over two RAM channels (docs/protocol.md §12), each a TLS connection made and
    checked like the main one; the destination routes both to the migration."""
    src = DaemonProcess(_with_tls(host_config("source", migration="channels = 2\n"),
                                  _tls(pki, "src")), "tls-ch-src")
    dst = DaemonProcess(_with_tls(host_config("destination"), _tls(pki, "dst")), "tls-ch-dst")
    try:
        for d in (src, dst):
            d.wait_ready()
        r = src.ctl("migrate", "g1", "--to", dst.migration_address, "--timeout", "60",
                    "--on-timeout", "force", "--json")
        assert r.returncode == 0, r.stdout + r.stderr + src.log() + dst.log()
        m = json.loads(r.stdout.strip().splitlines()[-1])["migration"]
        assert m["result"] == "completed" and m["verified"] is True
        assert dst.log().count("RAM channel connection from") == 2, dst.log()
    finally:
        for d in (src, dst):
            d.cleanup()
