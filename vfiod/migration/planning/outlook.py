"""Before a migration: will it converge, and what downtime to expect (docs/architecture.md §4;
``vfiod ctl check GUEST``).

Pure code, from what is known without migrating: each container's mapped RAM, whether
its dirty pages can be tracked in pre-copy, each device's stop-copy state size, the
bandwidth (the link's speed, the configured cap or the 1 Gb/s default, said which) and,
when a migration measured one, the dirty rate. The floor of the downtime is

    (RAM that pre-copy can never clean + Σ device stop-copy bytes) / bandwidth

RAM that pre-copy can never clean: a container with no dirty tracking reports every
mapped page dirty at every sync. A container holding a device with the pre-copy opt-out
is not queried before stop-and-copy either, but the migration counts only the part of
its RAM a sample shows written, or the part earlier migrations learnt
(``session/optout_sample.py``), which no check before it can know: its RAM is named
with the downtime if its device wrote all of it (``opted_out_bytes``), and the verdict
does not count it. Before that sample, an opted-out device in the default container
(all of the guest's RAM) made every such guest "will not converge" here, whatever its
device wrote, and its migrations ran to their timeout.

The verdict, with every reason:

* ``converges``: the floor is under the limit and nothing says pre-copy cannot catch up;
* ``converges only with a forced switchover``: the floor is over the limit (or the dirty
  rate is at or above the bandwidth) and the policy forces when pre-copy gives up;
* ``will not converge``: the same, and the policy cancels (the default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vfiod.migration.planning.convergence import size_text

CONVERGES = "converges"
FORCED = "converges only with a forced switchover"
WILL_NOT = "will not converge"


@dataclass(frozen=True)
class DeviceOutlook:
    name: str
    container: str
    container_ram_bytes: int        # the RAM its container maps
    tracked: bool                   # the container has a dirty-page tracker
    opted_out: bool                 # pre-copy dirty page tracking is off for it
    state_bytes: int | None         # stop-copy state size, None when the driver cannot say


@dataclass(frozen=True)
class Outlook:
    verdict: str
    predicted_downtime_s: float
    limit_s: float
    bandwidth_bps: float
    bandwidth_source: str
    always_dirty_bytes: int
    device_state_bytes: int
    reasons: tuple[str, ...]
    opted_out_bytes: int = 0        # RAM counted as far as its opted-out devices write it

    def to_json(self) -> dict[str, object]:
        return {"verdict": self.verdict,
                "predicted_downtime_ms": round(self.predicted_downtime_s * 1000, 1),
                "downtime_limit_ms": round(self.limit_s * 1000, 1),
                "bandwidth_bps": self.bandwidth_bps, "bandwidth_source": self.bandwidth_source,
                "always_dirty_bytes": self.always_dirty_bytes,
                "device_state_bytes": self.device_state_bytes,
                "opted_out_bytes": self.opted_out_bytes, "reasons": list(self.reasons)}


def _rate(bps: float) -> str:
    return f"{bps / (1 << 20):.1f} MiB/s"


def outlook(ram_bytes: int, devices: Sequence[DeviceOutlook], *, bandwidth_bps: float,
            bandwidth_source: str, limit_s: float, on_give_up: str = "cancel",
            dirty_rate_bps: float | None = None) -> Outlook:
    if bandwidth_bps <= 0 or limit_s <= 0:
        raise ValueError(f"bandwidth {bandwidth_bps} and limit {limit_s} must be positive")
    reasons: list[str] = []
    dirty_by_container: dict[str, int] = {}
    for d in devices:
        if not d.tracked:
            dirty_by_container[d.container] = d.container_ram_bytes
            reasons.append(f"{d.name}: its container has no dirty-page tracking: all "
                           f"{size_text(d.container_ram_bytes)} it maps are dirty at every pass")
    opted = [d for d in devices if d.tracked and d.opted_out
             and d.container not in dirty_by_container]
    always = min(ram_bytes, sum(dirty_by_container.values()))
    opted_bytes = min(ram_bytes - always,       # each container once, however many devices
                      sum({d.container: d.container_ram_bytes for d in opted}.values()))
    state = sum(d.state_bytes or 0 for d in devices)
    unknown = [d.name for d in devices if d.state_bytes is None]
    downtime = (always + state) / bandwidth_bps
    limit_ms = limit_s * 1000
    worst_ms = (always + opted_bytes + state) / bandwidth_bps * 1000
    for d in opted:
        shared = "shared " if any(
            o.container == d.container and o.name != d.name for o in devices) else ""
        reasons.append(f"{d.name}: pre-copy dirty tracking is off (opt-out): the "
                       f"{size_text(d.container_ram_bytes)} of RAM its {shared}container maps "
                       "is not queried until stop-and-copy; the migration counts the part a "
                       "sample of it shows written (if its devices wrote all of it: "
                       f"{worst_ms:.0f} ms at {_rate(bandwidth_bps)}, limit "
                       f"{limit_ms:.0f} ms)")
    over = downtime > limit_s
    if over:
        reasons.append(f"predicted downtime {downtime * 1000:.0f} ms > limit {limit_ms:.0f} ms:"
                       f" {size_text(always)} of RAM pre-copy cannot clean and {size_text(state)} of "
                       f"device state at {_rate(bandwidth_bps)} ({bandwidth_source})")
    big = [d for d in devices if (d.state_bytes or 0) / bandwidth_bps > limit_s]
    for d in big:
        reasons.append(f"{d.name}: its {size_text(d.state_bytes or 0)} of device state alone take "
                       f"{(d.state_bytes or 0) / bandwidth_bps * 1000:.0f} ms at "
                       f"{_rate(bandwidth_bps)}: too large for the {limit_ms:.0f} ms limit")
    racing = dirty_rate_bps is not None and dirty_rate_bps >= bandwidth_bps
    if racing:
        reasons.append(f"dirty rate {_rate(dirty_rate_bps or 0)} >= bandwidth "
                       f"{_rate(bandwidth_bps)}: pre-copy cannot catch up")
    if unknown:
        reasons.append(f"stop-copy state size unknown for {', '.join(unknown)} (not counted)")
    if over or racing:
        verdict = FORCED if on_give_up == "force" else WILL_NOT
    else:
        verdict = CONVERGES
        reasons.insert(0, f"predicted downtime {downtime * 1000:.0f} ms <= limit "
                          f"{limit_ms:.0f} ms at {_rate(bandwidth_bps)} ({bandwidth_source})")
    return Outlook(verdict, downtime, limit_s, bandwidth_bps, bandwidth_source, always, state,
                   tuple(reasons), opted_bytes)
