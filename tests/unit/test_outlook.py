"""The pre-migration outlook (docs/architecture.md §4): the downtime floor and the verdict,
converges / converges only with a forced switchover / will not converge, with reasons."""

from __future__ import annotations

import pytest

from vfiod.migration.planning.outlook import (
    CONVERGES,
    FORCED,
    WILL_NOT,
    DeviceOutlook,
    outlook,
)

MiB = 1 << 20


def dev(name: str = "d0", container: str = "c0", ram: int = 64 * MiB, *, tracked: bool = True,
        opted_out: bool = False, state: int | None = 12 * 1024) -> DeviceOutlook:
    return DeviceOutlook(name, container, ram, tracked, opted_out, state)


def test_a_tracked_guest_with_small_state_converges() -> None:
    o = outlook(64 * MiB, [dev()], bandwidth_bps=125e6, bandwidth_source="default",
                limit_s=0.3)
    assert o.verdict == CONVERGES and o.always_dirty_bytes == 0
    assert o.predicted_downtime_s == pytest.approx(12 * 1024 / 125e6)
    assert o.reasons[0].startswith("predicted downtime 0 ms <= limit 300 ms")


def test_opt_out_in_a_shared_container_names_its_worst_case_and_does_not_decide() -> None:
    """The migration counts the part of an opted-out container's RAM a sample shows
    written (``session/optout_sample.py``), which no check can know before: the RAM and
    the downtime if all of it were written are named, and the verdict stands on the rest
    (it said "will not converge" for every such guest, whatever its device wrote)."""
    devs = [dev("a"), dev("b", opted_out=True)]
    o = outlook(64 * MiB, devs, bandwidth_bps=32 * MiB, bandwidth_source="cap", limit_s=0.3)
    assert o.verdict == CONVERGES and o.always_dirty_bytes == 0
    assert o.opted_out_bytes == 64 * MiB and o.to_json()["opted_out_bytes"] == 64 * MiB
    assert o.predicted_downtime_s == pytest.approx(24 * 1024 / (32 * MiB))
    assert "b: pre-copy dirty tracking is off (opt-out): the 64 MiB of RAM its shared " \
        "container maps is not queried until stop-and-copy; the migration counts the part " \
        "a sample of it shows written (if its devices wrote all of it: 2001 ms at 32.0 " \
        "MiB/s, limit 300 ms)" in o.reasons
    # an untracked container counts whole, opted out or not
    both = [dev("a", tracked=False), dev("b", opted_out=True)]
    o = outlook(64 * MiB, both, bandwidth_bps=32 * MiB, bandwidth_source="cap", limit_s=0.3)
    assert o.verdict == WILL_NOT and (o.always_dirty_bytes, o.opted_out_bytes) == (64 * MiB, 0)
    assert outlook(64 * MiB, both, bandwidth_bps=32 * MiB, bandwidth_source="cap",
                   limit_s=0.3, on_give_up="force").verdict == FORCED


def test_no_dirty_tracking_is_named() -> None:
    o = outlook(64 * MiB, [dev(tracked=False)], bandwidth_bps=32 * MiB,
                bandwidth_source="cap", limit_s=0.3)
    assert o.verdict == WILL_NOT
    assert "d0: its container has no dirty-page tracking: all 64 MiB it maps are dirty at " \
        "every pass" in o.reasons


def test_device_state_too_large_for_the_limit_at_the_bandwidth() -> None:
    o = outlook(64 * MiB, [dev(state=96 * MiB)], bandwidth_bps=16 * MiB,
                bandwidth_source="cap", limit_s=0.3)
    assert o.verdict == WILL_NOT and o.device_state_bytes == 96 * MiB
    assert "d0: its 96 MiB of device state alone take 6000 ms at 16.0 MiB/s: too large for " \
        "the 300 ms limit" in o.reasons


def test_dirty_rate_at_or_above_the_bandwidth() -> None:
    o = outlook(64 * MiB, [dev()], bandwidth_bps=32 * MiB, bandwidth_source="measured",
                limit_s=0.3, dirty_rate_bps=40 * MiB)
    assert o.verdict == WILL_NOT
    assert "dirty rate 40.0 MiB/s >= bandwidth 32.0 MiB/s: pre-copy cannot catch up" \
        in o.reasons


def test_unknown_state_size_is_said_and_json_is_plain() -> None:
    o = outlook(64 * MiB, [dev(state=None)], bandwidth_bps=125e6, bandwidth_source="x",
                limit_s=0.3)
    assert "stop-copy state size unknown for d0 (not counted)" in o.reasons
    j = o.to_json()
    assert j["verdict"] == CONVERGES and j["downtime_limit_ms"] == 300.0
    with pytest.raises(ValueError):
        outlook(1, [], bandwidth_bps=0, bandwidth_source="x", limit_s=0.3)
