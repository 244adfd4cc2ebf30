"""The fault rig's network namespaces (tests/support/netns.py): a daemon in namespace A
migrates a guest to one in namespace B over the veth pair between them, and with the link
down it cannot reach B: the guest keeps running on A (docs/architecture.md §1 step 6)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.daemons import wait_until
from tests.support.fault_rig import FaultHost, RigGuest, host_config, pattern, where
from tests.support.netns import NetPair, veth_pair

GUESTS = [RigGuest("g1", 0), RigGuest("g2", 1)]
PORT = 47411
#: a numba compile on a cold cache makes the first dirty syncs slow: no downtime limit
#: to miss here
RELAXED = "downtime_limit_ms = 60000\n"


@pytest.fixture
def hosts() -> Iterator[tuple[NetPair, FaultHost, FaultHost]]:
    with veth_pair() as net:
        src = FaultHost("nsa", "source", GUESTS, lambda h: host_config(
            "source", GUESTS, h.root, f"{net.addr_a}:{PORT}", migration=RELAXED), netns=net.a)
        dst = FaultHost("nsb", "destination", GUESTS, lambda h: host_config(
            "destination", GUESTS, h.root, f"{net.addr_b}:{PORT}"), netns=net.b)
        try:
            src.start()
            dst.start()
            yield net, src, dst
        finally:
            src.close()
            dst.close()


def _ended(h: FaultHost, guest: str) -> dict | None:
    m = h.migration(guest)
    return m if m is not None and m["result"] is not None else None


def test_a_daemon_in_one_namespace_reaches_the_other_until_the_link_goes_down(
        hosts: tuple[NetPair, FaultHost, FaultHost]) -> None:
    net, src, dst = hosts
    to = f"{net.addr_b}:{PORT}"
    src.migrate("g1", to)
    m = wait_until(lambda: _ended(src, "g1"), 60, "g1's migration to end")
    assert m["result"] == "completed", (m, src.log(), dst.log())
    wait_until(lambda: dst.guest_state("g1") == "running", 30, "g1 to run in namespace B")
    assert dst.ram_digest("g1") == src.ram_digest("g1") != dst.ram_digest("g2")
    assert dst.ram_path("g1").read_bytes() == pattern("g1", GUESTS[0].ram_bytes)
    net.set_link(up=False)
    src.migrate("g2", to)
    m = wait_until(lambda: _ended(src, "g2"), 60, "g2's migration to end")
    assert m["result"] == "failed" and "cannot reach the destination" in m["error"], m
    assert where([src, dst], "g2") == {"nsa": "running", "nsb": "incoming"}
