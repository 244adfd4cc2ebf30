"""The fault matrix, network part (issue 10 item 6): a fault proxy between two real
daemons cuts, stalls, corrupts (16 bytes dropped), blinds (return path dropped) or delays
the migration's connection at each protocol point; then the guest must run on exactly
one host, or be paused with its outcome unknown on one host that can still resume it,
with the source's RAM as of the pause, and the journals must name the migration
(docs/architecture.md §1 steps 5-7). One pair of daemons serves every case, each with a
guest of its own; the outcomes fill the table the run prints."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fault_link import Fault, Point
from tests.support.fault_matrix import (
    MATRIX_MIGRATION,
    PointMissed,
    case_log,
    journals,
    judge,
    plan_for,
    record_case,
    start_through,
)
from tests.support.fault_rig import FaultPair, RigGuest, started_pair

FAULTS = [Fault.CUT, Fault.STALL, Fault.DROP_BYTES, Fault.DROP_RETURN, Fault.DELAY]
POINTS = list(Point)
CASES = [(f, p) for f in FAULTS for p in POINTS]
TABLE = "network faults"


def _guest(fault: Fault, point: Point) -> str:
    return f"{fault.value}.{point.value}"


@pytest.fixture(scope="module")
def pair() -> Iterator[FaultPair]:
    guests = [RigGuest(_guest(f, p), i, state_size=1 << 20) for i, (f, p) in enumerate(CASES)]
    with started_pair(guests, migration=MATRIX_MIGRATION) as p:
        yield p


@pytest.mark.parametrize("fault, point", CASES, ids=[_guest(f, p) for f, p in CASES])
def test_network_fault(pair: FaultPair, fault: Fault, point: Point) -> None:
    guest = _guest(fault, point)
    try:
        proxy, mid = start_through(pair, guest, plan_for(fault, point))
    except PointMissed:
        record_case(TABLE, fault.value, point, None, "the point was never reached")
        raise
    try:
        verdict = judge(pair, guest, mid, journals(pair, proxy))
    finally:
        proxy.close()
    record_case(TABLE, fault.value, point, verdict)
    verdict.check(lambda: case_log(pair, guest, mid))
