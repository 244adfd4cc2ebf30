"""The fault matrix, peer part (issue 10 items 3 and 6): a migration's stream recorded on
the wire and sent again to the destination is refused, and the guest keeps its one owner;
a TLS peer whose certificate identity is not on the destination's allow-list is refused;
and one case with a guest whose device keeps writing its RAM (a delayed link in
pre-copy): the destination runs it with the RAM as of the pause, not the pattern it
started from (docs/architecture.md §1 steps 5-6, §5)."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator

import pytest

from tests.support.daemons import wait_until
from tests.support.fault_link import Fault, FaultPlan, Point
from tests.support.fault_matrix import (
    MATRIX_MIGRATION,
    POINT_S,
    case_log,
    journals,
    judge,
    plan_for,
    start_through,
)
from tests.support.fault_pki import make_pki, tls_table
from tests.support.fault_proxy import FaultProxy
from tests.support.fault_rig import FaultHost, FaultPair, RigGuest, pattern, started_pair
from tests.support.fault_table import record
from vfiod.migration.transport.control import ControlMessage, ControlParser, TransportError

TABLE, COLUMN = "other faults", "outcome"
REPLAY, WORKLOAD = "replay", "workload.delay.pre-copy"


@pytest.fixture(scope="module")
def pair() -> Iterator[FaultPair]:
    guests = [RigGuest(REPLAY, 0, state_size=1 << 20),
              RigGuest(WORKLOAD, 1, state_size=1 << 20, dirty_rate=512 * 1024)]
    with started_pair(guests, migration=MATRIX_MIGRATION) as p:
        yield p


def _result(h: FaultHost, guest: str, mid: str) -> dict | None:
    m = h.migration(guest)
    return m if m is not None and m["id"] == mid and m["result"] is not None else None


def _replay(address: tuple[str, int], data: bytes) -> list[ControlMessage]:
    """Send a recorded stream to a migration port as it was; the frames it answers."""
    parser = ControlParser("replay")
    answers: list[ControlMessage] = []
    with socket.create_connection(address, timeout=30) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass                            # refused midway: read why
        while True:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            try:
                answers += parser.feed(chunk)
            except TransportError:
                break
    return answers


def test_replayed_stream_is_refused(pair: FaultPair) -> None:
    proxy = FaultProxy(pair.dst_address, FaultPlan(None, record=True))
    try:
        mid = pair.src.migrate(REPLAY, proxy.address)
        first = wait_until(lambda: _result(pair.src, REPLAY, mid), POINT_S, "the migration")
        assert first["result"] == "completed", case_log(pair, REPLAY, mid)
        recorded = bytes(proxy.link.recorded)
    finally:
        proxy.close()
    # back to the source, so that the destination waits for the guest again
    back = pair.dst.migrate(REPLAY, f"127.0.0.1:{pair.ports['src']}")
    again = wait_until(lambda: _result(pair.dst, REPLAY, back), POINT_S, "the way back")
    assert again["result"] == "completed", case_log(pair, REPLAY, back)
    wait_until(lambda: pair.src.guest_state(REPLAY) == "running", 30, "the guest back home")
    answers = _replay(pair.dst_address, recorded)
    took = [m.stage.value for m in answers if m.stage is not None
            and m.stage.value in ("prepared", "resumed")]
    verdict = judge(pair, REPLAY, mid, [pair.src, pair.dst])
    errors = [str(m.fields.get("message")) for m in answers if m.kind.name == "ERROR"]
    if took:
        verdict.problems.append(f"the replayed stream was taken: the destination answered {took}")
    elif not errors:
        verdict.problems.append(f"refused without a reason: answers {answers}")
    cell = f"refused ({errors[0]}); {verdict.cell}" if errors and not took else verdict.cell
    record(TABLE, "replay of a recorded stream", COLUMN, cell)
    verdict.check(lambda: case_log(pair, REPLAY, mid))


def test_workload_runs_on_with_the_ram_of_the_pause(pair: FaultPair) -> None:
    proxy, mid = start_through(pair, WORKLOAD, plan_for(Fault.DELAY, Point.PRECOPY))
    try:
        wait_until(lambda: _result(pair.src, WORKLOAD, mid), POINT_S, "the migration")
        at_pause = pair.src.ram_digest(WORKLOAD)     # paused, then released: kept as it was
        verdict = judge(pair, WORKLOAD, mid, journals(pair, proxy), expected=at_pause)
    finally:
        proxy.close()
    g = pair.guests[1]
    if at_pause == hashlib.sha256(pattern(WORKLOAD, g.ram_bytes)).hexdigest():
        verdict.problems.append("the workload never wrote the RAM: the case proves nothing")
    record(TABLE, "delay in pre-copy, device writing RAM", COLUMN, verdict.cell)
    verdict.check(lambda: case_log(pair, WORKLOAD, mid))


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultPair]:
    pki = tmp_path_factory.mktemp("pki")
    make_pki(pki, ["src", "dst"])

    def tls(host: str) -> str:
        # the destination takes migrations only from a host that is not the source
        return tls_table(pki, host, ["nobody.example"] if host == "dst" else None)
    p = FaultPair([RigGuest("tls", 0)], migration=MATRIX_MIGRATION, tls=tls)
    try:
        p.start()
        yield p
    finally:
        p.close()


def test_tls_peer_not_on_the_allow_list_is_refused(tls_pair: FaultPair) -> None:
    p = tls_pair
    mid = p.src.migrate("tls", "{}:{}".format(*p.dst_address))
    m = wait_until(lambda: _result(p.src, "tls", mid), POINT_S, "the migration to end")
    verdict = judge(p, "tls", mid, [p.src])
    if m["result"] == "completed":
        verdict.problems.append("a peer not on the allow-list migrated the guest")
    elif p.dst.guest_state("tls") != "incoming":
        verdict.problems.append("the destination took the guest from a refused peer")
    cell = f"refused ({m['error']}); {verdict.cell}" if not verdict.problems else verdict.cell
    record(TABLE, "TLS peer not on the allow-list", COLUMN, cell)
    verdict.check(lambda: case_log(p, "tls", mid))
