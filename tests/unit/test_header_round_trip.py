"""The round trip the commit's prediction uses (pass_drain.py; docs/protocol.md §8.5): the
HEADER's sample is timed from before the send, less the destination's reported work and
the sending thread's CPU in the send; a sample of zero or less is none; the estimate is
the median of whole round trips, a large pass's wait only a bound."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from vfiod.migration.session.pass_drain import RoundTrips, SourcePassDrain
from vfiod.migration.transport.control import AckStage, ControlMessage


class _Acks:
    def __init__(self, busy_s: float) -> None:
        self.busy_s = busy_s

    def wait_ack(self, stage: AckStage, timeout: float) -> ControlMessage:
        assert stage is AckStage.HEADER
        return ControlMessage.ack(AckStage.HEADER, 1, busy_s=self.busy_s)


def _source(now: float, busy_s: float) -> Any:
    s: Any = object.__new__(SourcePassDrain)
    s.link, s.clock = _Acks(busy_s), (lambda: now)
    s.config = SimpleNamespace(ack_timeout_s=1.0)
    s.result = SimpleNamespace(timings={})
    s._rtt, s._rtt_samples = 0.0, RoundTrips()
    return s


def test_the_header_round_trip_leaves_out_the_destinations_work_and_the_sends_cpu() -> None:
    # 10 ms from before the send to the ACK: 2 ms the destination's checks, 3 ms this
    # thread's CPU sending (a first send loading the checksum kernels)
    s = _source(now=1.010, busy_s=0.002)
    s._header_acked(1.000, sending_cpu_s=0.003)
    assert s.result.timings["header_ack_rtt_s"] == pytest.approx(0.005)
    assert s._rtt == pytest.approx(0.005)
    assert s.result.timings["rtt_s"] == pytest.approx(0.005)


def test_a_header_sample_of_zero_or_less_is_not_a_round_trip() -> None:
    s = _source(now=1.004, busy_s=0.005)
    s._header_acked(1.000, sending_cpu_s=0.0)
    assert s.result.timings["header_ack_rtt_s"] == 0.0
    assert s._rtt == 0.0 and "rtt_s" not in s.result.timings


def test_the_round_trip_is_the_median_of_whole_samples_and_bounds_only_stand_in() -> None:
    rt = RoundTrips()
    assert rt.estimate == 0.0
    rt.add(0.009, whole=False)           # a large pass: its backlog inside
    assert rt.estimate == 0.009          # nothing better yet
    rt.add(0.0004, whole=True)           # the HEADER
    rt.add(0.00002, whole=True)          # the scheduler shortened this one
    rt.add(0.0005, whole=True)
    rt.add(-0.001, whole=True)           # not a sample
    assert rt.estimate == 0.0004         # the median, not the shortened least
    assert rt.least == 0.00002
