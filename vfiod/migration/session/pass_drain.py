"""Waiting, at the end of each pre-copy pass, until the destination has consumed it
(docs/protocol.md §8.5 pass acknowledgements; docs/architecture.md §4 what the prediction
counts).

A socket accepts a pass long before the destination has read, checked and stored it:
on a fast link the kernel buffers of both ends hold megabytes (up to ``tcp_rmem``'s
maximum on the receiving side), and the source cannot see the destination's receive
queue. Bytes still queued when the guest pauses are paid for inside the downtime, and
no prediction made from the source's side alone knows how many there are. So when the
destination offers it (``pass_acks`` in its HELLO), the source asks for it in the
HEADER, the destination acknowledges every ITERATION mark once every page of that pass
has landed and been checked (its CRCs taken for the content digests, docs/protocol.md
§7.3), and the source waits for that ACK right after sending the mark, before its own
re-hash, its dirty sync and its prediction: the prediction then starts from an empty
pipe, and so does the stop-and-copy.

The wait also measures the path: the time from just before the mark's send to its ACK,
less the destination's reported work after the mark (``busy_s``; 0 now that it re-hashes
nothing, an older destination's re-hash) and this thread's CPU in the send, is an upper
bound of one round trip, and the least of these over the migration (with the HEADER's) is
the round-trip time the commit's prediction uses. The clock starts before the send, not
after it: a thread descheduled once its send returned would start it after the
destination had answered, a sample the scheduler shortened (in one process, 24 µs against
200-600 µs), and the commit was predicted from it. The wait's remainder, beyond that
round trip, is time the destination still needed for the pass's bytes: sending time the
bandwidth estimate must count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vfiod.migration.planning.predictor import DowntimePredictor
from vfiod.migration.session.common import SessionBase
from vfiod.migration.session.link import Link
from vfiod.migration.transport.control import AckStage, TransportCode, TransportError

#: how often a waiting source looks for an operator's cancel
CANCEL_POLL_S = 0.05
#: a pass's backlog counts as sending time only after this much data: after a few pages
#: (or none) the wait beyond one round trip is the round trip's jitter, not throughput, and
#: counted as sending time it drags the bandwidth estimate towards zero pass after pass
BACKLOG_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class PassDrained:
    """One pass's acknowledgement: ``waited_s`` from just before the mark's send to its
    ACK, of which ``busy_s`` was the destination's own work after the mark and
    ``sending_s`` this thread's CPU in the send; ``path_s`` the rest (the path and the
    destination's backlog)."""

    waited_s: float
    busy_s: float
    sending_s: float = 0.0

    @property
    def path_s(self) -> float:
        return max(0.0, self.waited_s - self.busy_s - self.sending_s)


def await_pass_consumed(link: Link, number: int, since: float, *, timeout_s: float,
                        clock: Callable[[], float], check_cancel: Callable[[], None],
                        sending_s: float = 0.0) -> PassDrained:
    """Block until the destination acknowledges pass ``number`` (the mark's send began at
    ``since`` and took ``sending_s`` of this thread's CPU). An earlier pass's ACK is
    dropped; an operator's cancel is honoured every ``CANCEL_POLL_S``; no ACK within
    ``timeout_s`` raises ``TransportError`` (TIMEOUT) naming the pass."""
    deadline = since + timeout_s
    peer = getattr(link, "peer", "destination")      # a Connection's, or a wrapper's
    while True:
        check_cancel()
        left = deadline - clock()
        if left <= 0:
            raise TransportError(TransportCode.TIMEOUT, peer,
                                 f"the destination did not acknowledge pre-copy pass "
                                 f"{number} within {timeout_s:g} s")
        try:
            ack = link.wait_ack(AckStage.PASS, min(left, CANCEL_POLL_S))
        except TransportError as e:
            if e.code is TransportCode.TIMEOUT:
                continue
            raise
        got = ack.fields.get("value")
        if not isinstance(got, int) or isinstance(got, bool):
            raise TransportError(TransportCode.CONTROL, peer,
                                 f"the destination's pass acknowledgement carries no pass "
                                 f"number: {got!r}")
        if got > number:
            raise TransportError(TransportCode.CONTROL, peer,
                                 f"the destination acknowledged pass {got}, but pass "
                                 f"{number} is the last one sent")
        if got == number:
            busy = ack.fields.get("busy_s", 0.0)
            busy = float(busy) if isinstance(busy, int | float) and busy >= 0 else 0.0
            return PassDrained(waited_s=max(0.0, clock() - since), busy_s=busy,
                               sending_s=sending_s)


class SourcePassDrain(SessionBase):
    """Mixed into ``SourceSession``: asks for pass acknowledgements when the destination
    offers them, and waits for each (a no-op with a destination that does not)."""

    predictor: DowntimePredictor
    _rtt: float
    _pass_acks: bool = False

    def _offer_pass_acks(self, hello: dict[str, Any]) -> bool:
        """Whether the HEADER asks for ACK pass: when the destination's HELLO offers it."""
        self._pass_acks = hello.get("pass_acks") is True
        self.result.timings["pass_drain_s"] = 0.0
        return self._pass_acks

    def _header_acked(self, since: float, sending_cpu_s: float) -> None:
        """Wait for the HEADER's ACK and learn a round trip from it: the time since
        ``since``, taken before the send (in one process the destination may answer
        before this thread runs again), less the destination's reported work and this
        thread's CPU in the send (a process's first send loads the checksum kernels)."""
        ack = self.link.wait_ack(AckStage.HEADER, self.config.ack_timeout_s)
        busy = ack.fields.get("busy_s", 0.0)
        busy = float(busy) if isinstance(busy, int | float) else 0.0
        rtt = self.clock() - since - busy - sending_cpu_s
        self._learn_rtt(rtt)
        self.result.timings["header_ack_rtt_s"] = max(0.0, rtt)

    def _learn_rtt(self, sample_s: float) -> None:
        """A round trip's upper bound (the HEADER's first, then each pass's): the least so
        far is the round trip (``timings["rtt_s"]``); the commit's prediction uses it. A
        sample of zero or less is none: the destination's own reported work covered the
        whole wait (the source's clock started late), which says nothing of the path."""
        if sample_s <= 0:
            return
        self._rtt = sample_s if self._rtt <= 0 else min(self._rtt, sample_s)
        self.result.timings["rtt_s"] = self._rtt

    def _await_pass(self, number: int, since: float, sent_bytes: int,
                    sending_s: float = 0.0) -> None:
        """Wait until the destination consumed pass ``number`` (its mark's send began at
        ``since`` and took ``sending_s`` of CPU, after ``sent_bytes`` of its RAM and
        device data); learn the round trip and the time its backlog took."""
        if not self._pass_acks:
            return
        d = await_pass_consumed(self.link, number, since, timeout_s=self.config.ack_timeout_s,
                                clock=self.clock, check_cancel=self._check_cancel,
                                sending_s=sending_s)
        t = self.result.timings
        t["pass_drain_s"] = t.get("pass_drain_s", 0.0) + d.waited_s
        self._learn_rtt(d.path_s)
        # what the path needed beyond one round trip was the destination still taking in
        # this pass's bytes: sending time, at no extra bytes
        backlog = d.path_s - self._rtt
        if backlog > 0 and sent_bytes >= BACKLOG_MIN_BYTES:
            self.predictor.bandwidth.record(since, since + backlog, 0)
