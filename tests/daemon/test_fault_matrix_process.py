"""The fault matrix, process part (issue 10 item 6): the source's or the destination's
daemon is SIGKILLed at each protocol point (the proxy holds the connection there, then
passes on the connection's end as the kernel would), then started again over its root:
its devices come back reset, its guests' RAM files are kept, and its journal says what
it had done. After any automatic resolution the guest must run on exactly one host, or
be paused with its outcome unknown on a host that can still resume it, with the
source's RAM as of the pause (docs/architecture.md §1 steps 7-8)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fault_link import Fault, FaultPlan, Point
from tests.support.fault_matrix import (
    MATRIX_MIGRATION,
    PointMissed,
    case_log,
    journals,
    judge,
    record_case,
    start_through,
)
from tests.support.fault_rig import FaultPair, RigGuest, started_pair

VICTIMS = ["source", "destination"]
CASES = [(v, p) for v in VICTIMS for p in Point]
TABLE = "process faults (SIGKILL, then restart)"


def _guest(victim: str, point: Point) -> str:
    return f"kill-{victim}.{point.value}"


@pytest.fixture(scope="module")
def pair() -> Iterator[FaultPair]:
    guests = [RigGuest(_guest(v, p), i, state_size=1 << 20) for i, (v, p) in enumerate(CASES)]
    with started_pair(guests, migration=MATRIX_MIGRATION) as p:
        yield p


@pytest.mark.parametrize("victim, point", CASES, ids=[_guest(v, p) for v, p in CASES])
def test_sigkill_then_restart(pair: FaultPair, victim: str, point: Point) -> None:
    for h in pair.hosts:                   # a case that failed may have left one down
        if not h.alive():
            h.start()
    guest = _guest(victim, point)
    row = f"SIGKILL {victim}"
    # the proxy holds the connection at the point while the process dies
    plan = FaultPlan(Fault.STALL, point)
    try:
        proxy, mid = start_through(pair, guest, plan)
    except PointMissed:
        record_case(TABLE, row, point, None, "the point was never reached")
        raise
    host = pair.src if victim == "source" else pair.dst
    try:
        host.sigkill()
        proxy.apply(Fault.CUT)             # its sockets closed with it
        host.start()
        # the proxy stays: the hosts' questions about the outcome go through it
        verdict = judge(pair, guest, mid, journals(pair, proxy))
    finally:
        proxy.close()
    record_case(TABLE, row, point, verdict)
    verdict.check(lambda: case_log(pair, guest, mid))
