"""The fault matrix, link part (issue 10 item 6): the source runs in one network namespace
and the destination in another, joined by a veth pair (tests/support/netns.py); the link
goes down in pre-copy and in stop-and-copy (the source's status says which phase it is
in), stays down until the source's migration has ended, and comes back up for any
automatic resolution. Then the guest runs on exactly one host, or is paused with its
outcome unknown on one host, with its RAM as of the pause (docs/architecture.md §1
steps 5-7). The source's bandwidth cap makes each phase last long enough to act in."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.daemons import wait_until
from tests.support.fault_matrix import MATRIX_MIGRATION, POINT_S, case_log, judge
from tests.support.fault_rig import FaultHost, FaultPair, RigGuest
from tests.support.fault_table import record
from tests.support.netns import NetPair, veth_pair

POINTS = {"pre-copy": "precopy", "stop-and-copy": "stopcopy"}
TABLE = "other faults"


@pytest.fixture(scope="module")
def net_pair() -> Iterator[tuple[NetPair, FaultPair]]:
    # no device pre-copy: all its 4 MiB of state moves in stop-and-copy, for a second
    guests = [RigGuest(f"link-down.{p}", i, ram_bytes=4 << 20, state_size=4 << 20,
                       capability="v2_stop_copy_log") for i, p in enumerate(POINTS)]
    with veth_pair("10.232.0") as net:
        p = FaultPair(guests, migration=MATRIX_MIGRATION + 'bandwidth_limit = "4MiB"\n',
                      net=net)
        try:
            p.start()
            yield net, p
        finally:
            p.close()


def _phase(src: FaultHost, guest: str, mid: str) -> str:
    m = src.migration(guest)
    assert m is not None and m["id"] == mid
    return "ended" if m["result"] is not None else str(m["progress"]["phase"])


@pytest.mark.parametrize("point", list(POINTS))
def test_link_down(net_pair: tuple[NetPair, FaultPair], point: str) -> None:
    net, pair = net_pair
    guest = f"link-down.{point}"
    mid = pair.src.migrate(guest, "{}:{}".format(*pair.dst_address))
    # as soon as the source says it is in that phase (each lasts about a second)
    wait_until(lambda: _phase(pair.src, guest, mid) in (POINTS[point], "ended"), POINT_S,
               f"{guest}'s migration to reach {point}")
    assert _phase(pair.src, guest, mid) != "ended", (
        f"the migration ended before the point: {pair.src.migration(guest)}")
    net.set_link(up=False)
    try:
        wait_until(lambda: _phase(pair.src, guest, mid) == "ended"
                   or pair.src.guest_state(guest) == "outcome-unknown", POINT_S,
                   "the source to give up on the link")
    finally:
        net.set_link(up=True)
    verdict = judge(pair, guest, mid, [pair.src])
    record(TABLE, f"link down in {point} (netns)", "outcome", verdict.cell)
    verdict.check(lambda: case_log(pair, guest, mid))
