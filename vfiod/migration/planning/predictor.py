"""Downtime prediction and the switchover policy (docs/architecture.md §4).

Pure code: every input carries its timestamp (``time.monotonic()`` seconds from the
caller), nothing here reads a clock, a socket or a device, so tests are deterministic.

Per iteration::

    predicted = (dirty RAM bytes not yet sent
                 + Σ device stop-copy bytes   (v2 MIG_DATA_SIZE / v1 pending_bytes / estimate)
                 + Σ device pre-copy bytes not yet read
                 - what a paced link passes at once (its full bucket)
                 + stream bytes still queued in the source's socket)
                / bandwidth
              + fixed costs measured on this path (device arcs, final sync, verify,
                the commit's round trips, the destination's resume: ``FixedCosts``)

Pieces:

* ``BandwidthEstimator``: bytes per second *while sending*, measured over windows of at
  least ``window_s`` (100 ms) of send time and smoothed with an EWMA. Idle time between
  passes (dirty syncs, device reads) is not counted: stop-and-copy sends back to back.
  Before the first window it uses what was sent so far once that took at least
  ``partial_s`` (2 ms) of send time: a small guest's whole first pass can be shorter than
  a window, and a guess (1 Gb/s) made a fast link's last bytes look many times dearer than
  they were. With less than that, the egress link's speed (``linkprior.LinkPrior``), or,
  when that is unknown, ``DEFAULT_BANDWIDTH_BPS`` (1 Gb/s), and ``source`` says which.
  The prior is asked for each time (a ``LinkPriorSource``): the daemon's lookup runs in
  a child process while the migration starts (``daemon/link_prior_lookup.py``), and its answer
  replaces the default when it arrives.
* ``DirtyRateEstimator``: bytes dirtied per second between successive dirty syncs (EWMA).
* ``DowntimePredictor.predict(inputs) -> Prediction``: the formula above, plus
  ``will_converge`` (False when the dirty rate is at or above the bandwidth, or when nothing
  tracks dirty pages; ``reason`` has the numbers). ``record_actual(seconds)`` after
  switchover gives the actual downtime and the prediction error ``|pred - act| / act``.
* ``Policy``: downtime limit (300 ms default), maximum iterations, timeout, and when pre-copy
  is not converging (vfiod.migration.planning.convergence: 20 passes without the remaining
  bytes shrinking, or 10 passes in a row of ``will_converge`` False, either for at least
  30 s) it gives up too, so no migration runs forever. Giving up does ``on_timeout``: "cancel" by default (the guest
  keeps running at the source) or "force" (switch over anyway, with the longer downtime);
  ``on_not_converging`` overrides it for the convergence case. ``decide(...)`` →
  ``Decision``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vfiod.migration.planning.linkprior import LinkPrior, LinkPriorSource

DEFAULT_BANDWIDTH_BPS = 1e9 / 8  # 1 Gb/s: a conservative guess when the link is unknown
DEFAULT_DOWNTIME_LIMIT_S = 0.300


def _rate(bps: float) -> str:
    if bps >= 1e9:
        return f"{bps / 1e9:.2f} GB/s"
    return f"{bps / 1e6:.1f} MB/s"


class BandwidthEstimator:
    def __init__(self, prior: LinkPriorSource = None, *, window_s: float = 0.1,
                 alpha: float = 0.5, default_bps: float = DEFAULT_BANDWIDTH_BPS,
                 partial_s: float = 0.002) -> None:
        if window_s < 0.1:
            raise ValueError(f"window_s {window_s} below 100 ms makes the estimate noise")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha {alpha} must be in (0, 1]")
        self._window_s = window_s
        self._partial_s = partial_s
        self._alpha = alpha
        self._ewma: float | None = None
        self._win_bytes = 0
        self._win_busy = 0.0
        self.windows = 0
        self._default_bps = default_bps
        self._prior_source = prior

    def _prior(self) -> tuple[float, str]:
        """The prior now, in bytes/s, and what it is."""
        source = self._prior_source
        prior: LinkPrior | None = source() if callable(source) else source
        if prior is not None and prior.speed_bps:
            return prior.speed_bps, f"link prior: {prior.note}"
        why = prior.note if prior is not None else "no link information"
        return (self._default_bps,
                f"default {_rate(self._default_bps)} (link speed unknown: {why})")

    def record(self, start: float, end: float, nbytes: int) -> None:
        """``nbytes`` went out between ``start`` and ``end`` (one send batch)."""
        if end < start or nbytes < 0:
            raise ValueError(f"bad transfer sample: {nbytes} bytes from {start} to {end}")
        self._win_bytes += nbytes
        self._win_busy += end - start
        if self._win_busy >= self._window_s:
            rate = self._win_bytes / self._win_busy
            self._ewma = rate if self._ewma is None else (
                self._alpha * rate + (1 - self._alpha) * self._ewma)
            self._win_bytes, self._win_busy = 0, 0.0
            self.windows += 1

    @property
    def _partial(self) -> bool:
        return self._ewma is None and self._win_busy >= self._partial_s

    @property
    def bps(self) -> float:
        if self._partial:
            return self._win_bytes / self._win_busy
        return self._prior()[0] if self._ewma is None else self._ewma

    @property
    def source(self) -> str:
        if self._partial:
            return (f"measured over {self._win_busy * 1000:.0f} ms of sending (less than "
                    f"one {self._window_s * 1000:.0f} ms window)")
        if self._ewma is None:
            return self._prior()[1]
        return f"measured over {self.windows} window(s) of >= {self._window_s * 1000:.0f} ms"


class DirtyRateEstimator:
    def __init__(self, *, alpha: float = 0.5) -> None:
        self._alpha = alpha
        self._last: float | None = None
        self._ewma: float | None = None

    def start(self, now: float) -> None:
        """Dirty tracking started (the first sync measures from here)."""
        self._last = now

    def record_sync(self, now: float, dirtied_bytes: int) -> None:
        """A sync at ``now`` found ``dirtied_bytes`` dirtied since the previous one."""
        if self._last is not None and now > self._last:
            rate = dirtied_bytes / (now - self._last)
            self._ewma = rate if self._ewma is None else (
                self._alpha * rate + (1 - self._alpha) * self._ewma)
        self._last = now

    @property
    def bps(self) -> float | None:
        return self._ewma


@dataclass(frozen=True)
class FixedCosts:
    """Time that does not depend on the bytes over the link, measured on this path during
    this migration (seconds); the parts of ``vfiod.migration.planning.breakdown``."""

    device_stop_s: float = 0.0         # the devices' state arcs at the pause
    final_sync_s: float = 0.0          # one more dirty sync
    record_overhead_s: float = 0.0     # framing CPU of the final pass beyond the link's time
    verify_s: float = 0.0              # the final re-hash
    commit_round_trips_s: float = 0.0  # PREPARED and COMMIT -> RESUMED
    dest_load_resume_s: float = 0.0    # the destination's devices: final load, resume
    journal_s: float = 0.0             # the switchover's journal records, both ends

    @property
    def total_s(self) -> float:
        return (self.device_stop_s + self.final_sync_s + self.record_overhead_s
                + self.verify_s + self.commit_round_trips_s + self.dest_load_resume_s
                + self.journal_s)


@dataclass(frozen=True)
class IterationInputs:
    now: float
    dirty_ram_bytes: int            # dirty RAM not yet sent
    device_stopcopy_bytes: int      # Σ over devices
    device_precopy_bytes: int = 0   # Σ pre-copy bytes not yet read
    tracking: bool = True           # False: no dirty tracking, every page is always dirty
    #: of ``dirty_ram_bytes``, counted dirty because an opted-out device's container is not
    #: queried before stop-and-copy (all of its mapped RAM, at every pass)
    assumed_dirty_bytes: int = 0
    #: stream bytes already sent but still in the source's socket send queue: on an
    #: unpaced link megabytes the destination has not received yet, and the commit waits
    #: for them (the destination's own receive queue is not visible from here)
    queued_bytes: int = 0
    #: bytes the link passes at once, without pacing, when the stop-and-copy begins (a
    #: rate limiter's full bucket): they cost no time at the measured bandwidth
    ready_bytes: int = 0


@dataclass(frozen=True)
class Prediction:
    at: float
    downtime_s: float
    ram_bytes: int
    device_bytes: int
    bandwidth_bps: float
    bandwidth_source: str
    dirty_rate_bps: float | None
    fixed_s: float
    will_converge: bool
    reason: str
    queued_bytes: int = 0
    ready_bytes: int = 0

    @property
    def remaining_bytes(self) -> int:
        return self.ram_bytes + self.device_bytes


@dataclass(frozen=True)
class Outcome:
    predicted_s: float
    actual_s: float
    error: float | None  # |pred - act| / act; None if act == 0


class DowntimePredictor:
    def __init__(self, bandwidth: BandwidthEstimator, dirty: DirtyRateEstimator | None = None,
                 costs: FixedCosts = FixedCosts()) -> None:
        self.bandwidth = bandwidth
        self.dirty = dirty or DirtyRateEstimator()
        self.costs = costs
        self.last: Prediction | None = None
        self.outcome: Outcome | None = None

    def predict(self, x: IterationInputs) -> Prediction:
        for name in ("dirty_ram_bytes", "device_stopcopy_bytes", "device_precopy_bytes",
                     "queued_bytes", "ready_bytes"):
            if getattr(x, name) < 0:
                raise ValueError(f"{name} is negative: {getattr(x, name)}")
        bw = self.bandwidth.bps
        dev = x.device_stopcopy_bytes + x.device_precopy_bytes
        total = x.dirty_ram_bytes + dev
        ready = min(x.ready_bytes, total)
        downtime = (total - ready + x.queued_bytes) / bw + self.costs.total_s
        rate = self.dirty.bps
        if not x.tracking:
            converge = False
            reason = (f"no dirty tracking: all {x.dirty_ram_bytes} bytes of RAM count as dirty "
                      f"at every pass, so pre-copy cannot converge")
        elif rate is not None and rate >= bw:
            converge = False
            reason = (f"dirty rate {_rate(rate)} >= bandwidth {_rate(bw)}: pre-copy cannot "
                      f"converge")
        else:
            converge = True
            dr = "not measured yet" if rate is None else _rate(rate)
            reason = (f"{total} bytes ({x.dirty_ram_bytes} RAM, {dev} device) + "
                      f"{x.queued_bytes} queued in the socket at {_rate(bw)} + "
                      f"{self.costs.total_s * 1000:.0f} ms fixed; dirty rate {dr}")
            if x.assumed_dirty_bytes:
                reason += (f"; {x.assumed_dirty_bytes} bytes of the RAM count dirty at "
                           "every pass (a device's pre-copy dirty tracking is off and its "
                           "container is not queried until stop-and-copy)")
        p = Prediction(x.now, downtime, x.dirty_ram_bytes, dev, bw, self.bandwidth.source,
                       rate, self.costs.total_s, converge, reason, x.queued_bytes, ready)
        self.last = p
        return p

    def record_actual(self, actual_s: float) -> Outcome:
        """After switchover: the measured downtime (source stop → destination ack)."""
        if self.last is None:
            raise RuntimeError("record_actual() before any prediction")
        if actual_s < 0:
            raise ValueError(f"actual downtime {actual_s} is negative")
        pred = self.last.downtime_s
        err = abs(pred - actual_s) / actual_s if actual_s > 0 else None
        self.outcome = Outcome(pred, actual_s, err)
        return self.outcome


class Decision(enum.Enum):
    CONTINUE = "continue"
    SWITCHOVER = "switchover"
    CANCEL = "cancel"
    FORCE = "force"


@dataclass(frozen=True)
class Policy:
    downtime_limit_s: float = DEFAULT_DOWNTIME_LIMIT_S
    max_iterations: int | None = None
    timeout_s: float | None = None
    on_timeout: str = "cancel"
    #: passes without the remaining bytes falling below 90 % of their lowest so far
    stall_iterations: int = 20
    #: passes in a row the predictor says ``will_converge`` False
    not_converging_iterations: int = 10
    #: ... and either held for at least this long
    not_converging_min_s: float = 30.0
    #: what to do when pre-copy is not converging; None: as ``on_timeout``
    on_not_converging: str | None = None

    def __post_init__(self) -> None:
        if self.downtime_limit_s <= 0:
            raise ValueError(f"downtime limit {self.downtime_limit_s} s must be positive")
        if self.max_iterations is not None and self.max_iterations < 1:
            raise ValueError(f"max_iterations {self.max_iterations} must be at least 1")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout {self.timeout_s} s must be positive")
        if self.on_timeout not in ("cancel", "force"):
            raise ValueError(f"on_timeout {self.on_timeout!r} must be 'cancel' or 'force'")
        if self.on_not_converging not in (None, "cancel", "force"):
            raise ValueError(f"on_not_converging {self.on_not_converging!r} must be 'cancel' "
                             "or 'force'")
        if self.not_converging_min_s < 0:
            raise ValueError(f"not_converging_min_s {self.not_converging_min_s} is negative")
        if self.stall_iterations < 1 or self.not_converging_iterations < 1:
            raise ValueError("stall_iterations and not_converging_iterations must be at "
                             "least 1")

    def verdict(self, p: Prediction, *, iteration: int, elapsed_s: float,
                not_converging: str | None = None) -> tuple[Decision, str]:
        """The decision after pass ``iteration`` (1-based) with its reason;
        ``not_converging``: why pre-copy is not converging (a ``ConvergenceWatch``)."""
        limit_ms = self.downtime_limit_s * 1000
        if p.downtime_s <= self.downtime_limit_s:
            return Decision.SWITCHOVER, (f"predicted downtime {p.downtime_s * 1000:.0f} ms <= "
                                         f"limit {limit_ms:.0f} ms")
        out = Decision.CANCEL if self.on_timeout == "cancel" else Decision.FORCE
        if self.timeout_s is not None and elapsed_s >= self.timeout_s:
            return out, (f"timeout {self.timeout_s:g} s reached with predicted downtime "
                         f"{p.downtime_s * 1000:.0f} ms > {limit_ms:.0f} ms")
        if self.max_iterations is not None and iteration >= self.max_iterations:
            return out, (f"{iteration} iterations reached with predicted downtime "
                         f"{p.downtime_s * 1000:.0f} ms > {limit_ms:.0f} ms")
        if not_converging is not None:
            give_up = self.on_not_converging or self.on_timeout
            return (Decision.CANCEL if give_up == "cancel" else Decision.FORCE), (
                f"{not_converging}; predicted downtime {p.downtime_s * 1000:.0f} ms > "
                f"limit {limit_ms:.0f} ms")
        return Decision.CONTINUE, (f"predicted downtime {p.downtime_s * 1000:.0f} ms > limit "
                                   f"{limit_ms:.0f} ms; {p.reason}")

    def decide(self, p: Prediction, *, iteration: int, elapsed_s: float,
               not_converging: str | None = None) -> Decision:
        return self.verdict(p, iteration=iteration, elapsed_s=elapsed_s,
                            not_converging=not_converging)[0]
