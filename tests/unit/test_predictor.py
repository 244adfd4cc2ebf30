"""Downtime predictor, switchover policy and the link-speed prior (docs/architecture.md §4)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from typing import Any

import pytest

from tests.support.daemons import wait_until
from vfiod.daemon.link_prior_lookup import LinkPriorLookup, probe_command
from vfiod.migration.planning.linkprior import LinkPrior, link_prior
from vfiod.migration.planning.predictor import (
    DEFAULT_BANDWIDTH_BPS,
    BandwidthEstimator,
    Decision,
    DirtyRateEstimator,
    DowntimePredictor,
    FixedCosts,
    IterationInputs,
    Policy,
    Prediction,
)

MB = 1_000_000
GB = 1_000_000_000


def prior(bps: float | None, note: str = "eth0 10000 Mb/s") -> LinkPrior:
    return LinkPrior("192.0.2.1", "eth0", bps, 1500, note)


# -- bandwidth ---------------------------------------------------------------------------

def test_bandwidth_prior_then_windows_of_at_least_100_ms() -> None:
    bw = BandwidthEstimator(prior(1.25 * GB))
    assert bw.bps == 1.25 * GB and bw.source == "link prior: eth0 10000 Mb/s"
    bw.record(0.0, 0.001, 1 * MB)       # 1 ms of sending: too little to say anything
    assert bw.bps == 1.25 * GB and bw.windows == 0
    bw.record(0.5, 0.549, 49 * MB)
    assert bw.windows == 0 and bw.bps == pytest.approx(1 * GB)   # 50 ms: a partial window
    assert "less than one 100 ms window" in bw.source
    bw.record(1.0, 1.05, 50 * MB)       # 100 ms of send time in total: 1 GB/s
    assert bw.bps == pytest.approx(1 * GB) and bw.windows == 1
    assert bw.source.startswith("measured over 1 window")
    bw.record(2.0, 2.1, 200 * MB)       # 2 GB/s; EWMA with alpha 0.5
    assert bw.bps == pytest.approx(1.5 * GB)


def test_a_short_first_pass_is_measured_not_guessed() -> None:
    # a small guest's first pass: 40 ms of sending at 1 GB/s on a link of unknown speed
    bw = BandwidthEstimator(None)
    bw.record(0.0, 0.04, 40 * MB)
    assert bw.bps == pytest.approx(1 * GB) and bw.bps != DEFAULT_BANDWIDTH_BPS


def test_idle_time_between_batches_is_not_counted() -> None:
    bw = BandwidthEstimator(None)
    bw.record(0.0, 0.1, 100 * MB)
    bw.record(5.0, 5.1, 100 * MB)  # five idle seconds in between change nothing
    assert bw.bps == pytest.approx(1 * GB)


def test_unknown_link_speed_uses_the_default_and_says_why() -> None:
    bw = BandwidthEstimator(prior(None, "lo: link speed not supported"))
    assert bw.bps == DEFAULT_BANDWIDTH_BPS
    assert "default 125.0 MB/s" in bw.source and "lo: link speed not supported" in bw.source
    assert "no link information" in BandwidthEstimator(None).source


def test_bandwidth_refuses_bad_parameters_and_samples() -> None:
    with pytest.raises(ValueError, match="below 100 ms"):
        BandwidthEstimator(None, window_s=0.05)
    with pytest.raises(ValueError, match="alpha"):
        BandwidthEstimator(None, alpha=0)
    with pytest.raises(ValueError, match="bad transfer sample"):
        BandwidthEstimator(None).record(2.0, 1.0, 10)


def test_dirty_rate_from_successive_syncs() -> None:
    d = DirtyRateEstimator()
    assert d.bps is None
    d.start(10.0)
    d.record_sync(10.5, 50 * MB)   # 100 MB/s
    assert d.bps == pytest.approx(100 * MB)
    d.record_sync(11.5, 300 * MB)  # 300 MB/s, EWMA 0.5 -> 200 MB/s
    assert d.bps == pytest.approx(200 * MB)


# -- prediction --------------------------------------------------------------------------

def predictor(bps: float, costs: FixedCosts | None = None) -> DowntimePredictor:
    bw = BandwidthEstimator(prior(bps))
    return DowntimePredictor(bw, DirtyRateEstimator(), costs or FixedCosts())


def test_prediction_counts_ram_device_state_and_fixed_costs() -> None:
    p = predictor(1 * GB, FixedCosts(device_stop_s=0.020, commit_round_trips_s=0.005))
    pred = p.predict(IterationInputs(now=3.0, dirty_ram_bytes=100 * MB,
                                     device_stopcopy_bytes=40 * MB, device_precopy_bytes=10 * MB))
    # (100 + 40 + 10) MB / 1 GB/s + 25 ms
    assert pred.downtime_s == pytest.approx(0.175)
    assert (pred.ram_bytes, pred.device_bytes, pred.remaining_bytes) == (
        100 * MB, 50 * MB, 150 * MB)
    assert pred.will_converge and "not measured yet" in pred.reason
    assert p.last is pred


def test_bytes_queued_in_the_socket_are_still_to_transfer() -> None:
    p = predictor(1 * GB, FixedCosts(commit_round_trips_s=0.005))
    base = p.predict(IterationInputs(now=1.0, dirty_ram_bytes=10 * MB, device_stopcopy_bytes=0))
    queued = p.predict(IterationInputs(now=1.0, dirty_ram_bytes=10 * MB,
                                       device_stopcopy_bytes=0, queued_bytes=4 * MB))
    # 4 MB the destination has not received yet cost 4 ms more at 1 GB/s
    assert queued.downtime_s - base.downtime_s == pytest.approx(0.004)
    assert queued.queued_bytes == 4 * MB and "4000000 queued in the socket" in queued.reason
    with pytest.raises(ValueError, match="queued_bytes is negative"):
        p.predict(IterationInputs(0.0, 0, 0, queued_bytes=-1))


def test_bytes_a_paced_link_passes_at_once_cost_no_time() -> None:
    p = predictor(1 * GB, FixedCosts(commit_round_trips_s=0.005))
    base = p.predict(IterationInputs(1.0, dirty_ram_bytes=10 * MB, device_stopcopy_bytes=MB))
    ready = p.predict(IterationInputs(1.0, dirty_ram_bytes=10 * MB, device_stopcopy_bytes=MB,
                                      ready_bytes=3 * MB))
    assert base.downtime_s - ready.downtime_s == pytest.approx(0.003)
    assert ready.ready_bytes == 3 * MB and ready.remaining_bytes == 11 * MB
    # never more than there is to send
    over = p.predict(IterationInputs(1.0, 0, device_stopcopy_bytes=MB, ready_bytes=64 * MB))
    assert over.ready_bytes == MB and over.downtime_s == pytest.approx(0.005)
    with pytest.raises(ValueError, match="ready_bytes is negative"):
        p.predict(IterationInputs(0.0, 0, 0, ready_bytes=-1))


def test_device_state_alone_can_exceed_the_limit() -> None:
    # QEMU's expected-downtime would say 0 here: no dirty RAM. Ours must not.
    pred = predictor(1 * GB).predict(IterationInputs(0.0, 0, device_stopcopy_bytes=500 * MB))
    assert pred.downtime_s == pytest.approx(0.5)


def test_will_not_converge_when_dirty_rate_reaches_bandwidth() -> None:
    p = predictor(100 * MB)
    p.dirty.start(0.0)
    p.dirty.record_sync(1.0, 150 * MB)
    pred = p.predict(IterationInputs(1.0, 150 * MB, 0))
    assert not pred.will_converge
    assert pred.reason == ("dirty rate 150.0 MB/s >= bandwidth 100.0 MB/s: pre-copy cannot "
                           "converge")


def test_no_dirty_tracking_never_converges() -> None:
    pred = predictor(1 * GB).predict(IterationInputs(0.0, 4 << 30, 0, tracking=False))
    assert not pred.will_converge and "no dirty tracking" in pred.reason


def test_prediction_error_after_switchover() -> None:
    p = predictor(1 * GB)
    with pytest.raises(RuntimeError, match="before any prediction"):
        p.record_actual(0.2)
    p.predict(IterationInputs(0.0, 200 * MB, 0))
    out = p.record_actual(0.25)
    assert (out.predicted_s, out.actual_s) == (pytest.approx(0.2), 0.25)
    assert out.error == pytest.approx(0.2)
    assert p.record_actual(0.0).error is None
    with pytest.raises(ValueError, match="negative"):
        p.record_actual(-1)


def test_negative_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="device_stopcopy_bytes is negative"):
        predictor(1 * GB).predict(IterationInputs(0.0, 0, -1))


# -- policy ------------------------------------------------------------------------------

def pred(downtime: float) -> Prediction:
    return Prediction(0.0, downtime, 0, 0, GB, "test", None, 0.0, True, "r")


def test_policy_switches_over_under_the_limit() -> None:
    pol = Policy()
    assert pol.downtime_limit_s == 0.3
    assert pol.decide(pred(0.3), iteration=1, elapsed_s=0) == Decision.SWITCHOVER
    assert pol.decide(pred(0.31), iteration=1, elapsed_s=0) == Decision.CONTINUE
    d, why = pol.verdict(pred(0.1), iteration=1, elapsed_s=0)
    assert d == Decision.SWITCHOVER and "100 ms <= limit 300 ms" in why


def test_policy_timeout_and_iteration_cap_cancel_or_force() -> None:
    cancel = Policy(timeout_s=60, max_iterations=10)
    assert cancel.decide(pred(1), iteration=3, elapsed_s=60) == Decision.CANCEL
    assert cancel.decide(pred(1), iteration=10, elapsed_s=1) == Decision.CANCEL
    assert cancel.decide(pred(1), iteration=9, elapsed_s=59) == Decision.CONTINUE
    force = Policy(timeout_s=60, on_timeout="force")
    d, why = force.verdict(pred(1), iteration=3, elapsed_s=61)
    assert d == Decision.FORCE and "timeout 60 s reached" in why
    # under the limit still wins over the timeout
    assert force.decide(pred(0.2), iteration=3, elapsed_s=61) == Decision.SWITCHOVER
    # no timeout and no cap: keep going until the operator cancels
    assert Policy().decide(pred(9), iteration=10_000, elapsed_s=1e6) == Decision.CONTINUE


@pytest.mark.parametrize("kw, msg", [
    ({"downtime_limit_s": 0}, "must be positive"),
    ({"max_iterations": 0}, "at least 1"),
    ({"timeout_s": -1}, "must be positive"),
    ({"on_timeout": "pause"}, "'cancel' or 'force'"),
])
def test_policy_refuses_bad_values(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        Policy(**kw)


# -- link prior --------------------------------------------------------------------------

class FakeMsg:
    def __init__(self, **attrs: Any) -> None:
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


class FakeIPRoute:
    def __init__(self, oif: int | None = 3, name: str = "ens1", error: Exception | None = None):
        self.oif, self.name, self.error, self.closed = oif, name, error, False

    def route(self, cmd: str, dst: str) -> list[FakeMsg]:
        assert cmd == "get"
        if self.error:
            raise self.error
        return [FakeMsg(RTA_OIF=self.oif)]

    def get_links(self, index: int) -> list[FakeMsg]:
        return [FakeMsg(IFLA_IFNAME=self.name, IFLA_MTU=9000)]

    def close(self) -> None:
        self.closed = True


class FakeEthtool:
    def __init__(self, speed: Any = 25000, error: Exception | None = None) -> None:
        self.speed, self.error = speed, error

    def get_link_mode(self, ifname: str) -> Any:
        if self.error:
            raise self.error
        return type("Mode", (), {"speed": self.speed})()

    def close(self) -> None:
        pass


def test_link_prior_known_speed() -> None:
    ipr = FakeIPRoute()
    lp = link_prior("192.0.2.7", iproute=lambda: ipr, ethtool=lambda: FakeEthtool(25000))
    assert lp == LinkPrior("192.0.2.7", "ens1", 25000e6 / 8, 9000, "ens1 25000 Mb/s")
    assert ipr.closed


@pytest.mark.parametrize("speed", [None, 0, -1, 0xFFFFFFFF])
def test_link_prior_unknown_speeds(speed: Any) -> None:
    lp = link_prior("192.0.2.7", iproute=FakeIPRoute, ethtool=lambda: FakeEthtool(speed))
    assert lp.speed_bps is None and "reports no link speed" in lp.note


def test_link_prior_not_supported_and_no_route() -> None:
    class NotSupportedError(Exception):
        pass

    lp = link_prior("127.0.0.1", iproute=lambda: FakeIPRoute(name="lo"),
                    ethtool=lambda: FakeEthtool(error=NotSupportedError("lo")))
    assert lp.speed_bps is None and "lo: link speed not supported (NotSupportedError" in lp.note
    lp = link_prior("198.51.100.1", iproute=lambda: FakeIPRoute(error=OSError(101, "unreach")))
    assert lp.ifname is None and "route lookup for 198.51.100.1 failed" in lp.note
    lp = link_prior("198.51.100.1", iproute=lambda: FakeIPRoute(oif=None))
    assert "names an interface" in lp.note


def test_link_prior_on_the_real_loopback() -> None:
    lp = link_prior("127.0.0.1")
    assert lp.ifname == "lo" and lp.speed_bps is None and lp.note.startswith("lo: ")
    bw = BandwidthEstimator(lp)
    assert bw.bps == DEFAULT_BANDWIDTH_BPS and "lo: " in bw.source


NEEDS_NETNS = "needs root and the 'ip' tool (iproute2) to build a veth pair in a netns"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason=NEEDS_NETNS)
def test_link_prior_on_a_veth_pair_in_a_private_netns() -> None:
    ns = f"vfiod-test-{uuid.uuid4().hex[:8]}"
    ip = shutil.which("ip") or "ip"

    def sh(*args: str) -> None:
        subprocess.run([ip, *args], check=True, capture_output=True, timeout=30)

    sh("netns", "add", ns)
    try:
        sh("-n", ns, "link", "add", "vf0", "type", "veth", "peer", "name", "vf1")
        sh("-n", ns, "addr", "add", "10.203.0.1/24", "dev", "vf0")
        sh("-n", ns, "link", "set", "vf0", "up")
        sh("-n", ns, "link", "set", "vf1", "up")
        # the daemon's way: the probe in a child process (here inside the netns)
        lookup = LinkPriorLookup("10.203.0.2", command=[ip, "netns", "exec", ns,
                                                        *probe_command()]).start()
        try:
            wait_until(lambda: lookup.answered, 60, "the lookup in the netns")
        finally:
            lookup.close()
        # the kernel's veth driver reports 10 Gb/s
        assert lookup.current() == LinkPrior("10.203.0.2", "vf0", 1.25e9, 1500,
                                             "vf0 10000 Mb/s")
    finally:
        subprocess.run([ip, "netns", "del", ns], capture_output=True, timeout=30)
