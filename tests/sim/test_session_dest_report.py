"""Both ends report the downtime (docs/architecture.md §4, docs/protocol.md §8.3): the
destination gives its own share (from the source's stopped device state arriving to the
guest resumed: load, verify, resume) and the source's predicted downtime, which the
DIGESTS frame carries; the downtime and the prediction error are the source's, measured
when the destination's last word (ACK resumed) arrives."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.session_rig import MiB, SideContainer, assert_migrated, migrate, pair, spec
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
    assert d.actual_downtime_s is None and d.prediction_error is None   # the source's
    assert r.downtime_share == {}                                       # the destination's


def test_the_digests_frame_carries_the_prediction_only_when_there_is_one() -> None:
    parser = ControlParser("source")
    frames = parser.feed(ControlMessage.digests(3, [], predicted_downtime_s=0.125).encode()
                         + ControlMessage.digests(3, []).encode())
    assert [f.kind for f in frames] == [ControlType.DIGESTS] * 2
    assert frames[0].fields == {"records": 3, "regions": [], "predicted_downtime_s": 0.125}
    assert frames[1].fields == {"records": 3, "regions": []}
