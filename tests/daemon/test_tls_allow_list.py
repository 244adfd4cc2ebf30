"""Who may migrate a guest (``daemon/peer_auth.py``, docs/protocol.md §2): daemons over mutual
TLS refuse a peer whose certificate names are not on the allow-list, with a reason naming
them, and the guest keeps running on the source; a listed peer migrates it. Over plain TCP
each migration logs that its link is unauthenticated, and ``ctl check`` says so."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.test_tls_daemons import _make_ca, _make_host, _tls, _with_tls
from tests.support.daemon_configs import host_config
from tests.support.daemons import DaemonProcess, daemon_pair, guest_status, wait_until

G1 = 'name = "g1"\n'


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("allow-pki")
    _make_ca(d, "ca")
    for host in ("src", "strict", "open"):
        _make_host(d, host, "ca")       # the CN is the host's name
    return d


@pytest.fixture(scope="module")
def daemons(pki: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess, DaemonProcess]]:
    # strict: g1 may come only from host-z.example (its own list replaces the global one,
    # which would allow src); open: the global list names src (in other case).
    strict_cfg = _with_tls(host_config("destination"),
                           _tls(pki, "strict") + 'allow = ["src"]\n')
    strict_cfg = strict_cfg.replace(G1, G1 + 'allow_peers = ["host-z.example"]\n', 1)
    open_cfg = _with_tls(host_config("destination"),
                         _tls(pki, "open") + 'allow = ["host-y.example", "SRC"]\n')
    src = DaemonProcess(_with_tls(host_config("source"), _tls(pki, "src")), "allow-src")
    strict = DaemonProcess(strict_cfg, "allow-strict")
    opened = DaemonProcess(open_cfg, "allow-open")
    try:
        for d in (src, strict, opened):
            d.wait_ready()
        yield src, strict, opened
    finally:
        for d in (src, strict, opened):
            d.cleanup()


def _migrate(src: DaemonProcess, dst: DaemonProcess) -> tuple[int, dict[str, object]]:
    r = src.ctl("migrate", "g1", "--to", dst.migration_address, "--timeout", "60",
                "--on-timeout", "force", "--json")
    return r.returncode, json.loads(r.stdout.strip().splitlines()[-1])["migration"]


def _reload(d: DaemonProcess, config: str) -> None:
    n = len(d.notify.messages)
    d.config_path.write_text(config)
    d.signal(signal.SIGHUP)
    d.notify.wait_for("READY", after=n)
    st = d.call("status")["daemon"]
    assert st["reload_error"] is None and st["restart_needed"] == [], st


def test_a_peer_off_the_list_is_refused_then_a_listed_one_migrates(
        daemons: tuple[DaemonProcess, ...]) -> None:
    src, strict, opened = daemons
    code, m = _migrate(src, strict)
    assert code == 1 and m["result"] == "failed", m
    error = str(m["error"])
    assert "not on the allow-list" in error and "src" in error, error
    assert "guest g1 allow_peers is host-z.example" in error, error
    g = guest_status(src, "g1")
    assert g["state"] == "running"
    assert {d["state_label"] for d in g["devices"]} == {"RUNNING"}
    assert guest_status(strict, "g1")["state"] == "incoming"
    assert "incoming migrate from 127.0.0.1" in strict.log()
    assert "is not on the allow-list" in strict.log()

    check = strict.ctl("check", "g1").stdout
    assert "note: TLS: peers allowed by guest g1 allow_peers: host-z.example" in check, check
    check = src.ctl("check", "g1").stdout
    assert "note: TLS: any peer certified by the CA" in check, check

    # The source checks the destination too: with a global list naming only host-x
    # (applied by SIGHUP, no restart), it does not even offer g1 to "open".
    good = src.config_path.read_text()
    _reload(src, good.replace('ca = "', 'allow = ["host-x.example"]\nca = "', 1))
    code, m = _migrate(src, opened)
    error = str(m["error"])
    assert code == 1 and "this host does not allow that destination" in error, m
    assert "its certificate names open" in error and "host-x.example" in error, error
    assert guest_status(src, "g1")["state"] == "running"
    assert "incoming migrate" not in opened.log()
    _reload(src, good)

    code, m = _migrate(src, opened)
    assert code == 0 and m["result"] == "completed", (m, src.log(), opened.log())
    # The source returns on the destination's acknowledgement; its status follows.
    wait_until(lambda: guest_status(opened, "g1")["state"] == "running", 30,
               "g1 running on the listed destination")
    assert "not authenticated" not in src.log() + opened.log()


def test_plain_tcp_is_reported_unauthenticated() -> None:
    with daemon_pair(host_config("source"), host_config("destination"),
                     "plain-src", "plain-dst") as (src, dst):
        r = src.ctl("check", "g1", "--json")
        assert json.loads(r.stdout)["link"] == {"tls": False, "allow_peers": []}
        check = src.ctl("check", "g1").stdout
        assert "note: migration link is not authenticated: plain TCP" in check, check
        r = src.ctl("migrate", "g1", "--to", dst.migration_address, "--timeout", "60",
                    "--on-timeout", "force")
        assert r.returncode == 0, r.stdout + r.stderr
        addr = dst.migration_address
        assert f"migration link to {addr} is not authenticated: plain TCP" in src.log()
        assert "migration link from 127.0.0.1:" in dst.log()
        assert dst.log().count("is not authenticated: plain TCP") == 1
