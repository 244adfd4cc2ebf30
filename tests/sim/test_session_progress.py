"""Progress during a pass (docs/architecture.md §4 prediction, §6 ``vfiod ctl watch``): the
session's status and its ``live`` callback show bytes sent, RAM still to send in the pass,
the measured throughput and an ETA while a pass runs, not only once it ends.

The link is capped (``ThrottledLink``), so each 1 MiB slice takes at least 130 ms: longer
than the publish interval (100 ms), so every slice publishes. Status is read on the
session's own thread, between two sends (a link that records it), so the reads fall
inside the first pass by construction, without sleeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.session_rig import (
    MiB,
    SideContainer,
    assert_migrated,
    migrate,
    side_pairs,
    spec,
)
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import SessionConfig
from vfiod.migration.session.link import ThrottledLink
from vfiod.migration.session.status import (
    IterationProgress,
    LiveProgress,
    StatusSnapshot,
    live_progress,
)
from vfiod.vfio import RamRegion

RAM = (RamRegion("ram", 0, 16 * MiB),)
PLANS = [SideContainer([spec("v2_precopy_log")])]
RATE = 8e6


@pytest.fixture
def sides(tmp_path: Path):
    with side_pairs(tmp_path, PLANS, RAM) as make:
        yield make


class StatusReader(ThrottledLink):
    """A capped link that reads the session's status after every send."""

    def __init__(self, link: Any) -> None:
        super().__init__(link, RATE)
        self.session: Any = None
        self.seen: list[StatusSnapshot] = []

    def send_buffers(self, buffers: Any) -> None:
        super().send_buffers(buffers)
        if self.session is not None:
            self.seen.append(self.session.status())


def test_status_and_live_figures_move_during_the_first_pass(
        sides, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = sides(fill_bytes=6 * MiB)
    import tests.support.session_rig as rig

    links: list[StatusReader] = []
    real = rig.connect

    def connect(*a: Any, **k: Any) -> Any:
        links.append(StatusReader(real(*a, **k)))
        return links[-1]

    monkeypatch.setattr(rig, "connect", connect)
    published: list[LiveProgress] = []

    def on_source(s: Any) -> None:
        links[0].session = s
        s.live = published.append

    run = migrate(src, dst, SessionConfig(slice_bytes=1 * MiB), on_source=on_source)
    assert_migrated(src, dst, run)

    first = [s for s in links[0].seen
             if s.iteration == 1 and s.last is None and s.live is not None]
    assert len(first) >= 3
    a, b = first[0], first[-1]
    assert b.bytes_sent > a.bytes_sent                          # bytes move within the pass
    assert b.live is not None and a.live is not None
    assert b.live.bytes_sent > a.live.bytes_sent
    assert b.live.ram_remaining_bytes < a.live.ram_remaining_bytes
    measured = [s.live for s in first if s.live is not None and s.live.throughput_bps]
    assert measured, "no throughput measured during the first pass"
    # the cap bounds what was measured (a slice's send time includes the pacing)
    assert all(m.throughput_bps <= RATE * 1.5 for m in measured if m.throughput_bps)
    assert all(m.eta_s is not None and m.eta_s >= 0 for m in measured)
    assert b.to_dict()["live"]["ram_remaining_bytes"] == b.live.ram_remaining_bytes

    # the live callback was told during the first pass, several times, bytes growing
    pass1 = [p for p in published if p.iteration == 1]
    assert len(pass1) >= 2
    assert pass1[-1].bytes_sent > pass1[0].bytes_sent
    # the session holds no live figures once it ended (nothing is sending)
    assert run.session is not None and run.session.status().live is None


def _last(device_bytes: int, predicted_s: float) -> IterationProgress:
    return IterationProgress(
        iteration=3, elapsed_s=1.0, ram_sent_bytes=0, device_sent_bytes=0,
        total_sent_bytes=0, remaining_bytes=0, dirty_ram_bytes=0, device_bytes=device_bytes,
        dirty_rate_bps=None, bandwidth_bps=1e6, bandwidth_source="", will_converge=True,
        predicted_downtime_s=predicted_s, decision="continue", reason="", sync_s=0.0)


def test_eta_is_what_is_left_at_the_throughput_plus_the_predicted_switchover() -> None:
    lp = live_progress(4, 10, 3_000_000, 1e6, _last(1_000_000, 0.25))
    assert lp.device_remaining_bytes == 1_000_000
    assert lp.predicted_switchover_s == 0.25
    assert lp.eta_s == pytest.approx(4.25)
    # before the first prediction: the pass's share only
    assert live_progress(1, 10, 2_000_000, 1e6, None).eta_s == pytest.approx(2.0)
    # no measured throughput yet: no ETA rather than a guess
    assert live_progress(1, 10, 2_000_000, None, None).eta_s is None


def test_each_pass_shows_its_number_and_size_from_its_start(tmp_path: Path) -> None:
    """A pass publishes its number and the RAM it is to send before its first slice, so a
    status read early in pass P says P, not the end of pass P-1: a reader that compares
    two reads of one pass sees the figures move even when a pass is two slices (a 64 MiB
    guest at 64 MiB/s in 32 MiB slices, tests/daemon/test_two_daemons.py), where only the
    instant between the last slice and the pass's end showed a second figure of it."""
    plans = [SideContainer([spec("v2_precopy")])]      # no DMA logging: all RAM dirty
    with side_pairs(tmp_path, plans, RAM) as make:
        src, dst = make(fill_bytes=6 * MiB)
        events: list[tuple[str, int, int]] = []
        box: dict[str, Any] = {}

        def on_source(s: Any) -> None:
            box["s"] = s
            s.live = lambda lp: events.append(("live", lp.iteration, lp.ram_remaining_bytes))

        def progress(p: IterationProgress) -> None:
            events.append(("end", p.iteration, p.dirty_ram_bytes))
            if p.iteration == 3:
                box["s"].cancel("seen three passes")

        cfg = SessionConfig(slice_bytes=4 * MiB, policy=Policy(downtime_limit_s=1e-9))
        run = migrate(src, dst, cfg, on_source=on_source, progress=progress, rate_bps=64e6)
        assert run.source.result == "cancelled", run.source.reason
    ends = [i for i, e in enumerate(events) if e[0] == "end"]
    assert [events[i][1] for i in ends] == [1, 2, 3], events
    for i in ends[:2]:          # passes 2 and 3: all 16 MiB dirty at the sync before them
        _, n, dirty = events[i]
        assert dirty == 16 * MiB, events
        assert events[i + 1] == ("live", n + 1, dirty), events
        during = [e[2] for e in events[i + 1:] if e[:2] == ("live", n + 1)]
        assert len(during) >= 2 and during == sorted(during, reverse=True), events
