"""The migration port's limits (README "Limits"), in-process: a connection that sends no
offer is closed at its deadline; a flood holds at most ``max_pending`` threads and a real
source still gets an answer; TLS handshakes run off the accept thread, under their own
deadline."""

from __future__ import annotations

import errno
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from tests.daemon.test_tls_daemons import _make_ca, _make_host
from tests.support.daemons import wait_until
from vfiod.daemon.backoff import ACCEPT_BACKOFF_S
from vfiod.daemon.config import MigrationConfig
from vfiod.daemon.guests import GuestManager
from vfiod.daemon.migrations import MigrationService
from vfiod.daemon.offer import Offer, OfferLimits
from vfiod.daemon.registry import Registry
from vfiod.migration.planning.hostfacts import HostFacts
from vfiod.migration.transport import AckStage, TlsConfig, TransportCode, TransportError, connect


def _no_facts() -> HostFacts:
    raise AssertionError("no session starts in these tests")


def _service(limits: OfferLimits, tls: TlsConfig | None = None
             ) -> tuple[MigrationService, tuple[str, int]]:
    # No guest is configured: every offer is answered "no guest", after the limits apply.
    svc = MigrationService(Registry(), cast(GuestManager, None), _no_facts,
                           MigrationConfig(), tls, limits)
    return svc, svc.listen("127.0.0.1", 0)


@pytest.fixture
def service() -> Iterator[Callable[..., tuple[MigrationService, tuple[str, int]]]]:
    made: list[MigrationService] = []

    def make(limits: OfferLimits, tls: TlsConfig | None = None
             ) -> tuple[MigrationService, tuple[str, int]]:
        svc, addr = _service(limits, tls)
        made.append(svc)
        return svc, addr
    yield make
    for svc in made:
        svc.shutdown(10)


def _closed_within(s: socket.socket, seconds: float) -> float:
    """Read until the daemon closes ``s``; how long that took (fails past ``seconds``)."""
    t0 = time.monotonic()
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {seconds:g} s") from None
    return time.monotonic() - t0


def _incoming_threads() -> int:
    return sum(t.name == "vfiod-incoming" for t in threading.enumerate())


def _offer_refusal(addr: tuple[str, int], tls: TlsConfig | None = None) -> str:
    """Offer guest "nobody" as a real source does; the destination's refusal."""
    with connect(addr[0], addr[1], tls=tls, timeout=10) as conn:
        conn.send_buffers([Offer("nobody", "m1", "src").encode()])
        with pytest.raises(TransportError) as exc:
            conn.wait_ack(AckStage.OFFER, 10)
    assert exc.value.code is TransportCode.PEER_ERROR
    return str(exc.value)


def test_connections_without_an_offer_are_closed_at_their_deadline(service) -> None:  # type: ignore[no-untyped-def]
    _, addr = service(OfferLimits(max_pending=8, deadline_s=0.5))
    silent = [socket.create_connection(addr, timeout=10) for _ in range(3)]
    slow = socket.create_connection(addr, timeout=10)
    slow.sendall(b"V")                           # one byte, then nothing
    for s in (*silent, slow):
        assert _closed_within(s, 5) < 4
        s.close()
    wait_until(lambda: _incoming_threads() == 0, 10, "the offer threads to end")


def test_a_flood_of_slow_connections_is_bounded(service) -> None:  # type: ignore[no-untyped-def]
    svc, addr = service(OfferLimits(max_pending=8, deadline_s=60))
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _incoming_threads())
            stop.wait(0.002)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    flood = []
    try:
        for _ in range(300):
            s = socket.create_connection(addr, timeout=10)
            s.sendall(b"V")
            flood.append(s)
        wait_until(lambda: len(svc.offers) == 8 and _incoming_threads() <= 8, 10,
                   "the flood to settle at 8 pending offers")
        # A real source still gets its answer: its offer comes at once.
        assert "this host has no guest 'nobody' configured" in _offer_refusal(addr)
        # The evicted were closed, not left hanging: the first is long gone.
        assert _closed_within(flood[0], 1) < 1
    finally:
        stop.set()
        sampler.join(10)
        for s in flood:
            s.close()
    assert peak[0] <= 12, f"{peak[0]} offer threads for 8 slots"


class _EmfileListener:
    """accept_raw() fails EMFILE ``n`` times, then the service is closing."""

    def __init__(self, svc: MigrationService, n: int) -> None:
        self.svc, self.n, self.calls = svc, n, 0

    def accept_raw(self, timeout: float) -> None:
        self.calls += 1
        if self.calls > self.n:
            self.svc._closing.set()
        raise TransportError(TransportCode.IO, "here", "accept: EMFILE", errno=errno.EMFILE)


def test_the_accept_loop_backs_off_on_emfile() -> None:
    svc = MigrationService(Registry(), cast(GuestManager, None), _no_facts,
                           MigrationConfig())
    fake = _EmfileListener(svc, 8)
    svc.listener = fake  # type: ignore[assignment]
    pauses: list[float] = []
    svc.backoff.pause = pauses.append
    svc._accept_loop()
    first, cap = ACCEPT_BACKOFF_S
    assert fake.calls == 9 and len(pauses) == 9
    assert pauses[0] == first and pauses[-1] == cap and pauses == sorted(pauses)


OPENSSL = shutil.which("openssl")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if OPENSSL is None:
        pytest.skip("needs the openssl command to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_host(d, "dst", "ca")
    _make_host(d, "src", "ca")
    return d


def _tls(d: Path, who: str) -> TlsConfig:
    return TlsConfig(str(d / f"{who}.pem"), str(d / f"{who}.key"), str(d / "ca.pem"))


def test_tls_handshakes_run_off_the_accept_thread(service, pki: Path) -> None:  # type: ignore[no-untyped-def]
    _, addr = service(OfferLimits(max_pending=32, deadline_s=30, handshake_s=1.0),
                      _tls(pki, "dst"))
    # Twenty peers that connect and never start their handshake...
    stalled = [socket.create_connection(addr, timeout=10) for _ in range(20)]
    garbage = socket.create_connection(addr, timeout=10)
    garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
    # ...do not delay a real source (on the accept thread they cost 0.5 s each).
    t0 = time.monotonic()
    assert "no guest 'nobody'" in _offer_refusal(addr, _tls(pki, "src"))
    assert time.monotonic() - t0 < 3
    assert _closed_within(garbage, 5) < 1          # refused by the handshake at once
    for s in stalled:                              # and each stalled one at its deadline
        assert _closed_within(s, 5) < 3
        s.close()
    garbage.close()


def test_accepted_abort_wakes_a_blocked_handshake(pki: Path) -> None:
    from vfiod.migration.transport import Listener
    with Listener("127.0.0.1", 0, tls=_tls(pki, "dst")) as lst:
        peer = socket.create_connection(lst.address, timeout=10)
        accepted = lst.accept_raw(10)
        errors: list[TransportError] = []

        def shake() -> None:
            try:
                accepted.handshake(30)
            except TransportError as e:
                errors.append(e)
        t = threading.Thread(target=shake)
        t.start()
        accepted.abort()
        t.join(10)
        assert not t.is_alive() and errors and errors[0].code is TransportCode.TLS
        peer.close()


