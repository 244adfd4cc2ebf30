"""After the commit nothing resumes on its own (docs/architecture.md §1.7): the findings
"lost acknowledgement after the commit" and "warnings that nobody sees", with two real
daemons and a fault proxy between them. The source's unsettled outcome shows in status
and the log, is settled by asking the destination, or by ``vfiod ctl resolve`` when the
destination cannot be asked."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator

import pytest

from tests.support.daemons import child_env, vfiod_cmd, wait_until
from tests.support.fault_link import Fault, FaultPlan, Point
from tests.support.fault_proxy import FaultProxy
from tests.support.fault_rig import FaultHost, RigGuest, pattern, started_pair, where
from vfiod.api.client import ClientError

G = RigGuest("g1", 2)
PATTERN = hashlib.sha256(pattern(G.name, G.ram_bytes)).hexdigest()


@pytest.fixture
def hosts() -> Iterator[tuple[FaultHost, FaultHost]]:
    with started_pair([G]) as pair:
        yield pair.src, pair.dst


def _why(a: FaultHost, b: FaultHost) -> str:
    return f"{where([a, b], G.name)}\n--- src\n{a.log()[-4000:]}\n--- dst\n{b.log()[-4000:]}"


def test_a_swallowed_resumed_ack_is_settled_by_asking_never_by_resuming(
        hosts: tuple[FaultHost, FaultHost]) -> None:
    a, b = hosts
    proxy = FaultProxy(("127.0.0.1", int(b.migration_address.rsplit(":", 1)[1])),
                       FaultPlan(Fault.CUT, Point.RESUMED_SWALLOWED))
    try:
        a.migrate(G.name, proxy.address)
        proxy.wait_fired(60)
        wait_until(lambda: where([a, b], G.name) == {"src": "incoming", "dst": "running"}, 60,
                   lambda: _why(a, b))
    finally:
        proxy.close()
    assert b.ram_digest(G.name) == PATTERN
    log = a.log()
    assert "outcome unsettled" in log and "rolled back" not in log, log[-3000:]
    assert "the peer's journal says resumed" in log, log[-3000:]


def test_a_peer_gone_for_good_shows_outcome_unknown_until_resolved_by_hand(
        hosts: tuple[FaultHost, FaultHost]) -> None:
    a, b = hosts
    with pytest.raises(ClientError, match="has no unsettled migration"):
        a.call("resolve", {"guest": G.name, "resume_here": True})
    proxy = FaultProxy(("127.0.0.1", int(b.migration_address.rsplit(":", 1)[1])),
                       FaultPlan(Fault.CUT, Point.COMMIT))
    a.migrate(G.name, proxy.address)
    proxy.wait_fired(60)
    proxy.close()                   # the destination cannot be asked any more
    g = wait_until(lambda: (g := a.guest(G.name))["unsettled"] and
                   g["unsettled"]["peer_last_error"] and g, 60, lambda: _why(a, b))
    assert g["state"] == "outcome-unknown", g
    assert g["unsettled"]["role"] == "source" and g["unsettled"]["peer"] == proxy.address
    assert g["migration"]["state"] == "unsettled" and g["migration"]["result"] is None, g
    # the session's warning reaches status (and the log), not only its result
    assert any("stays paused here" in w for w in g["migration"]["warnings"]), g["migration"]
    assert "stays paused here" in a.log()
    # B got the COMMIT and runs it; A keeps it paused with its device state
    wait_until(lambda: b.guest_state(G.name) == "running", 30, lambda: _why(a, b))
    assert [d["state_label"] for d in g["devices"]] == ["SAVING"], g["devices"]
    text = subprocess.run(vfiod_cmd("ctl", "--socket", a.socket, "status", G.name),
                          capture_output=True, text=True, timeout=60, env=child_env()).stdout
    assert "OUTCOME UNKNOWN" in text and "vfiod ctl resolve g1" in text, text
    assert "warning: committed, but the destination's answer did not arrive" in text, text
    # the operator says: it runs on B
    r = subprocess.run(vfiod_cmd("ctl", "--socket", a.socket, "resolve", G.name, "--discard"),
                       capture_output=True, text=True, timeout=60, env=child_env())
    assert r.returncode == 0 and "resolved by hand: discard here" in r.stdout, r
    assert where([a, b], G.name) == {"src": "incoming", "dst": "running"}
    assert b.ram_digest(G.name) == PATTERN
