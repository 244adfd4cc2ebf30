"""The round trips the commit's prediction uses (pass_drain.py; docs/protocol.md §8.5): the
HEADER's and each pass's sample is timed from before the send, less the destination's
reported work and the sending thread's CPU in the send; the least is the round trip, and
a sample of zero or less is none."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from vfiod.migration.session.pass_drain import SourcePassDrain
from vfiod.migration.transport.control import AckStage, ControlMessage


class _Acks:
    def __init__(self, busy_s: float) -> None:
        self.busy_s = busy_s

    def wait_ack(self, stage: AckStage, timeout: float) -> ControlMessage:
        return ControlMessage.ack(stage, 1, busy_s=self.busy_s)


def _source(now: float, busy_s: float) -> Any:
    s: Any = object.__new__(SourcePassDrain)
    s.link, s.clock = _Acks(busy_s), (lambda: now)
    s.config = SimpleNamespace(ack_timeout_s=1.0)
    s.result = SimpleNamespace(timings={})
    s._rtt, s._pass_acks = 0.0, True
    s._check_cancel = lambda: None
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


def test_a_pass_sample_is_timed_from_before_the_marks_send_and_the_least_is_kept() -> None:
    s = _source(now=1.010, busy_s=0.0)
    s._header_acked(1.000, sending_cpu_s=0.0)               # 10 ms: a fresh process's
    assert s._rtt == pytest.approx(0.010)
    # pass 1's mark: its send began at 1.008 and took 1 ms of this thread's CPU
    s._await_pass(1, 1.008, sent_bytes=4096, sending_s=0.001)
    assert s._rtt == pytest.approx(0.001)
    assert s.result.timings["pass_drain_s"] == pytest.approx(0.002)
