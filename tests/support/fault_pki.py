"""Test certificates for the fault matrix's TLS case (``openssl``): one CA, and per host a
certificate usable both ways (a vfiod is a source and a destination), its subject
``CN=<host>`` and a 127.0.0.1 SAN."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)


def make_pki(d: Path, hosts: list[str]) -> None:
    """``d/ca.pem`` and ``d/HOST.pem``, ``d/HOST.key`` for each host."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(d, "req", "-x509", *ec, "-subj", "/CN=fault-ca", "-days", "2", "-keyout",
             "ca.key", "-out", "ca.pem", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign")
    for host in hosts:
        (d / f"{host}.ext").write_text("subjectAltName=IP:127.0.0.1\n"
                                       "extendedKeyUsage=serverAuth,clientAuth\n"
                                       "keyUsage=critical,digitalSignature\n")
        _openssl(d, "req", *ec, "-subj", f"/CN={host}", "-keyout", f"{host}.key",
                 "-out", f"{host}.csr")
        _openssl(d, "x509", "-req", "-in", f"{host}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", f"{host}.ext",
                 "-out", f"{host}.pem")


def tls_table(d: Path, host: str, allow: list[str] | None = None) -> str:
    """``host``'s ``[migration.tls]`` table; ``allow``: the peers it accepts."""
    text = (f'[migration.tls]\ncert = "{d}/{host}.pem"\nkey = "{d}/{host}.key"\n'
            f'ca = "{d}/ca.pem"\n')
    if allow is not None:
        text += "allow = [" + ", ".join(f'"{a}"' for a in allow) + "]\n"
    return text
