"""The TLS allow-list in the configuration (``[migration.tls] allow``, a guest's
``allow_peers``; docs/architecture.md §6): read into the dataclasses, and every bad value
refused naming file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon.test_config import GOOD
from vfiod.daemon.config import MigrationConfig, load_config, parse_config
from vfiod.daemon.peer_auth import allowed_peers, link_notes
from vfiod.errors import ConfigError

TLS_CA = 'ca = "/etc/vfiod/ca.pem"'
G2 = 'name = "g2"'


def _with(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


def test_lists_are_read_and_the_guests_wins() -> None:
    text = _with(GOOD, TLS_CA, TLS_CA + '\nallow = ["host-b.example", "Host-C"]')
    text = _with(text, G2, G2 + '\nallow_peers = ["host-d.example"]')
    cfg = parse_config(text, host_memory=1 << 40)
    assert cfg.migration.allow_peers == ("host-b.example", "Host-C")
    g1, g2 = cfg.guests
    assert g1.allow_peers is None and g2.allow_peers == ("host-d.example",)
    assert allowed_peers(g1, cfg.migration) == (("host-b.example", "Host-C"),
                                                "[migration.tls] allow")
    assert allowed_peers(g2, cfg.migration) == (("host-d.example",), "guest g2 allow_peers")
    assert link_notes(g2, cfg.migration) == [
        "TLS: peers allowed by guest g2 allow_peers: host-d.example"]


def test_absent_lists_accept_any_peer_the_ca_signed() -> None:
    cfg = parse_config(GOOD, host_memory=1 << 40)
    assert cfg.migration.allow_peers == () and cfg.guests[0].allow_peers is None
    assert link_notes(cfg.guests[0], cfg.migration)[0].startswith(
        "TLS: any peer certified by the CA")
    plain = MigrationConfig()
    assert "not authenticated: plain TCP" in link_notes(cfg.guests[0], plain)[0]


@pytest.mark.parametrize("old, new, at, message", [
    (TLS_CA, TLS_CA + "\nallow = []", "allow =",
     "migration.tls.allow: is empty, which would refuse every peer"),
    (TLS_CA, TLS_CA + '\nallow = "host-b"', "allow =",
     "migration.tls.allow: must be an array of certificate names"),
    (TLS_CA, TLS_CA + "\nallow = [1]", "allow =",
     "migration.tls.allow: must be an array of certificate names"),
    (TLS_CA, TLS_CA + '\nallow = ["*.example"]', "allow =",
     "migration.tls.allow: '*.example': wildcards are not matched"),
    (TLS_CA, TLS_CA + '\nallow = [" host-b"]', "allow =",
     "migration.tls.allow: ' host-b' is not a certificate name"),
    (TLS_CA, TLS_CA + '\nallow = ["host\\tb"]', "allow =",
     "is not a certificate name"),
    (TLS_CA, TLS_CA + '\nallw = ["host-b"]', "allw =",
     "migration.tls.allw: unknown key 'allw'"),
    (G2, G2 + "\nallow_peers = []", "allow_peers =",
     "guest[1].allow_peers: is empty, which would refuse every peer"),
    (G2, G2 + '\nallow_peers = ["' + "h" * 256 + '"]', "allow_peers =",
     "guest[1].allow_peers: 'hhhh"),
])
def test_bad_lists_name_key_and_line(tmp_path: Path, old: str, new: str, at: str,
                                     message: str) -> None:
    text = _with(GOOD, old, new)
    f = tmp_path / "vfiod.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(str(f))
    line = [i for i, s in enumerate(text.splitlines(), 1) if at in s][-1]
    assert str(exc.value).startswith(f"{f}:{line}: "), str(exc.value)
    assert message in str(exc.value)


def test_a_guests_list_without_tls_is_refused() -> None:
    start = GOOD.index("[migration.tls]")
    text = GOOD[:start] + GOOD[GOOD.index("[paths]"):]
    text = _with(text, G2, G2 + '\nallow_peers = ["host-b"]')
    line = [i for i, s in enumerate(text.splitlines(), 1) if "allow_peers" in s][0]
    with pytest.raises(ConfigError, match=rf"^\(text\):{line}: guest\[1\]\.allow_peers: "
                                          r"needs \[migration\.tls\]"):
        parse_config(text, host_memory=1 << 40)
