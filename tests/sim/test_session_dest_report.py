"""Both ends report the downtime (docs/architecture.md §4, docs/protocol.md §8.3): the
destination gives its own share (from the source's stopped device state arriving to the
guest resumed: load, verify, resume) and the source's predicted downtime, which the
DIGESTS frame carries; the downtime and the prediction error are the source's, measured
when the destination's last word (ACK resumed) arrives and sent in a REPORT frame after it
(docs/protocol.md §8.2), so the destination reports them too."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.session_rig import MiB, SideContainer, assert_migrated, migrate, pair, spec
from vfiod.errors import ProtocolError
from vfiod.migration.session.common import MigrationResult
from vfiod.migration.session.link import ThrottledLink
from vfiod.migration.session.source import SourceSession
from vfiod.migration.transport.control import ControlMessage, ControlParser, ControlType
from vfiod.vfio import RamRegion

RAM = (RamRegion("ram", 0, 8 * MiB),)


@pytest.mark.parametrize("cap", ["v2_precopy_log", "v1"])
def test_the_destination_reports_its_share_and_the_sources_prediction(
        tmp_path: Path, cap: str) -> None:
    src, dst = pair(tmp_path, [SideContainer([spec(cap)])], ram=RAM, fill_bytes=1 * MiB)
    try:
        run = migrate(src, dst)
        assert_migrated(src, dst, run)
    finally:
        src.close()
        dst.close()
    r, d = run.source, run.dest
    assert d is not None and r.actual_downtime_s is not None
    assert d.predicted_downtime_s == r.predicted_downtime_s
    share = d.downtime_share
    assert set(share) == {"total_s", "load_s", "verify_s", "resume_s"}
    assert all(v >= 0 for v in share.values())
    assert share["total_s"] >= share["resume_s"] and share["total_s"] >= share["load_s"]
    assert share["verify_s"] == d.verification["final_verify_s"]
    # the destination's interval lies inside the source's (pause -> ACK resumed): one host
    assert share["total_s"] <= r.actual_downtime_s
    # the source's figures, which its REPORT brought after ACK resumed
    assert (d.actual_downtime_s, d.prediction_error) == (r.actual_downtime_s,
                                                         r.prediction_error)
    assert not any("report" in w for w in d.warnings + r.warnings), (d.warnings, r.warnings)
    assert r.downtime_share == {}                                       # the destination's


class DropReport(ThrottledLink):
    """A source link that never sends its REPORT (an older peer, a lost frame)."""

    def send_control(self, msg: ControlMessage) -> None:
        if msg.kind is not ControlType.REPORT:
            super().send_control(msg)


def test_without_the_sources_report_the_destination_still_completes(tmp_path: Path) -> None:
    src, dst = pair(tmp_path, [SideContainer([spec("v2_precopy_log")])], ram=RAM,
                    fill_bytes=1 * MiB)

    def drop(s: SourceSession) -> None:
        s.link = DropReport(s.link, 1e12)

    try:
        run = migrate(src, dst, on_source=drop)
        assert_migrated(src, dst, run)
    finally:
        src.close()
        dst.close()
    d = run.dest
    assert d is not None and d.result == "completed" and d.verified
    assert d.actual_downtime_s is None and d.prediction_error is None
    assert d.predicted_downtime_s == run.source.predicted_downtime_s      # from DIGESTS
    assert [w for w in d.warnings if w.startswith("source report not received")], d.warnings


def test_the_report_frame_carries_the_sources_figures() -> None:
    frames = ControlParser("source").feed(ControlMessage.report(0.05, 0.04, 0.2).encode())
    assert [f.kind for f in frames] == [ControlType.REPORT]
    res = MigrationResult("destination", "g", "id", "completed", "COMPLETED")
    res.take_downtime_report(frames[0].fields)
    assert (res.actual_downtime_s, res.predicted_downtime_s, res.prediction_error) == (
        0.05, 0.04, 0.2)


@pytest.mark.parametrize("fields", [{}, {"actual_downtime_s": "50 ms"},
                                    {"actual_downtime_s": 0.05, "prediction_error": True}])
def test_a_report_without_numbers_is_refused(fields: dict[str, object]) -> None:
    res = MigrationResult("destination", "g", "id", "completed", "COMPLETED")
    with pytest.raises(ProtocolError, match="source report"):
        res.take_downtime_report(fields)
    assert res.actual_downtime_s is None


def test_the_digests_frame_carries_the_prediction_only_when_there_is_one() -> None:
    parser = ControlParser("source")
    frames = parser.feed(ControlMessage.digests(3, [], predicted_downtime_s=0.125).encode()
                         + ControlMessage.digests(3, []).encode())
    assert [f.kind for f in frames] == [ControlType.DIGESTS] * 2
    assert frames[0].fields == {"records": 3, "regions": [], "predicted_downtime_s": 0.125}
    assert frames[1].fields == {"records": 3, "regions": []}
