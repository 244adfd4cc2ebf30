"""A flood from one client process during a real migration (README "Limits"): 200 idle
control connections, and on the destination's migration port 50 silent, 50 slow (one
byte a second, ``tests/support/flood.py``) and 50 malformed connections (on a TLS port: TLS garbage). The migration completes verified, and
``status`` answers on both daemons within its deadline while the flood holds its
connections."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.test_tls_daemons import OPENSSL, _make_ca, _make_host, _tls, _with_tls
from tests.support.daemon_configs import host_config
from tests.support.daemons import DaemonProcess, daemon_pair, guest_status, wait_until
from tests.support.flood import MALFORMED, SLOW_PAYLOAD, Flood, address

STATUS_DEADLINE_S = 5.0


@pytest.fixture(scope="module", params=["tcp", "tls"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    src_cfg = host_config("source", workloads={"g1": ("128KiB", "2MiB")})
    dst_cfg = host_config("destination")
    if request.param == "tls":
        if OPENSSL is None:
            pytest.skip("needs the openssl command to make test certificates")
        d = tmp_path_factory.mktemp("pki")
        _make_ca(d, "ca")
        _make_host(d, "src", "ca")
        _make_host(d, "dst", "ca")
        src_cfg, dst_cfg = _with_tls(src_cfg, _tls(d, "src")), _with_tls(dst_cfg, _tls(d, "dst"))
    with daemon_pair(src_cfg, dst_cfg, f"flood-{request.param}-src",
                     f"flood-{request.param}-dst") as daemons:
        yield daemons


def _timed_status(d: DaemonProcess) -> float:
    t0 = time.monotonic()
    with d.client() as c:
        assert c.call("status")["guests"]
    return time.monotonic() - t0


def test_migration_and_status_survive_a_flood(pair: tuple[DaemonProcess, DaemonProcess]
                                              ) -> None:
    src, dst = pair
    with Flood([src.socket, dst.socket], address(dst.migration_address)):
        assert _timed_status(src) < STATUS_DEADLINE_S
        assert _timed_status(dst) < STATUS_DEADLINE_S
        r = src.ctl("migrate", "g1", "--to", dst.migration_address, "--timeout", "60",
                    "--on-timeout", "force", "--json")
        assert r.returncode == 0, r.stdout + r.stderr + src.log() + dst.log()
        final = json.loads(r.stdout.strip().splitlines()[-1])["migration"]
        assert final["result"] == "completed" and final["verified"] is True, final
        wait_until(lambda: guest_status(dst, "g1")["state"] == "running", 30,
                   "g1 to run on the destination")
        assert _timed_status(src) < STATUS_DEADLINE_S
        assert _timed_status(dst) < STATUS_DEADLINE_S


def test_slow_clients_send_one_byte_a_second(tmp_path: Path) -> None:
    """The flood's slow clients trickle their payload: a byte a second, no faster."""
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.bind(str(tmp_path / "c.sock"))
    ctl.listen(8)
    port = socket.create_server(("127.0.0.1", 0))
    got: dict[socket.socket, bytes] = {}

    def pump(_: float) -> None:
        ready, _w, _x = select.select([port, *got], [], [], 0.2)
        for s in ready:
            if s is port:
                got[port.accept()[0]] = b""
            else:
                got[s] += s.recv(64)

    def slow_bytes() -> int:
        return max((len(b) for b in got.values() if SLOW_PAYLOAD.startswith(b)), default=0)

    try:
        with Flood([ctl.getsockname()], port.getsockname(), idle=2, silent=1, slow=2,
                   malformed=1):
            t0 = time.monotonic()
            wait_until(lambda: slow_bytes() >= 3, 10, "three trickled bytes", pump)
            assert slow_bytes() <= 2 + int(time.monotonic() - t0)    # started just before t0
            assert [b for b in got.values() if b == MALFORMED], "the malformed client sent"
        assert len(got) == 4
    finally:
        for s in got:
            s.close()
        port.close()
        ctl.close()
