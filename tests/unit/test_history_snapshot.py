"""A host's switchover histories survive a daemon restart as a snapshot
(docs/architecture.md §1.8, §4 "Earlier switchovers"): what is restored predicts as
before the restart, and a damaged snapshot is refused naming what is wrong."""

from __future__ import annotations

import json

import pytest

from vfiod.migration.planning.breakdown import COMPONENTS
from vfiod.migration.planning.predictor import FixedCosts
from vfiod.migration.session.history import HostHistories, SwitchoverHistory
from vfiod.migration.session.history_snapshot import (
    MAX_SNAPSHOT_BYTES,
    HistorySnapshotError,
    decode,
    encode,
)
from vfiod.migration.stream.header import DeviceInfo

BIG = DeviceInfo("0000:3b:00.0", "v2", 7, {"vendor": "0x15b3", "device": "0x101e"})
UART = DeviceInfo("mtty-0", "v2", 3, {"vendor": "0x0000", "device": "mtty"})
MEASURED = FixedCosts(device_stop_s=0.001, final_sync_s=0.010, commit_round_trips_s=0.0002,
                      dest_load_resume_s=0.0001, verify_s=0.0001)
PREDICTED = {"device_stop": 0.006, "final_sync": 0.010, "ram_transfer": 0.100,
             "verify": 0.0001, "commit_round_trips": 0.0002, "dest_load_resume": 0.0001}


def _learn(h: SwitchoverHistory, commit_s: float, records: int = 0,
           device_bytes: int = 48 << 20) -> None:
    actual = {c: PREDICTED.get(c, 0.0) for c in COMPONENTS}
    actual.update(commit_round_trips=commit_s, device_stop=0.030, dest_load_resume=0.020,
                  final_sync=0.002, ram_transfer=0.104, verify=0.0004)
    h.record(MEASURED, PREDICTED, actual, device_bytes, stream_end_s=0.001,
             final_records=records)


def _host() -> HostHistories:
    hosts = HostHistories()
    big = hosts.of("vm1", [BIG])
    for commit, records in ((0.004, 10), (0.006, 40), (0.009, 80)):
        _learn(big, commit, records)
    big.record_opted_out(256, 1024, 2.0)
    _learn(hosts.of("vm2", [UART]), 0.001, device_bytes=96)
    return hosts


def _predictions(h: SwitchoverHistory) -> list[FixedCosts]:
    return [h.correct(MEASURED, device_bytes=b, records=r)
            for b, r in ((96, 0), (16 << 20, 30), (64 << 20, 200))]


def test_restored_histories_predict_as_before_the_restart() -> None:
    before = _host()
    after = decode(encode(before))
    for guest, dev in (("vm1", BIG), ("vm2", UART)):
        b, a = before.of(guest, [dev]), after.of(guest, [dev])
        assert a.migrations == b.migrations
        assert _predictions(a) == _predictions(b)
        assert a.lessons() == b.lessons() == {"history_switchovers": float(b.migrations),
                                              "history_borrowed": 0.0}
        assert a.opted_out_share(1.0) == b.opted_out_share(1.0)
    assert after.of("vm1", [BIG]).opted_out_share(1.0) == pytest.approx(0.125)


def test_a_newcomer_after_the_restart_borrows_from_the_latest_kin() -> None:
    """Which kin is the latest is the switchovers' order, not the file's or the use
    order: vm-old is used after vm-new switched over, and still lends nothing."""
    before = HostHistories()
    _learn(before.of("vm-old", [BIG]), 0.5)
    _learn(before.of("vm-new", [BIG]), 0.2)
    before.of("vm-old", [BIG])                      # used last, switched over first
    after = decode(encode(before))
    newcomer = after.of("vm-3", [BIG])
    assert newcomer.lessons() == {"history_switchovers": 1.0, "history_borrowed": 1.0}
    assert newcomer.correct(MEASURED, device_bytes=0).commit_round_trips_s == \
        pytest.approx(MEASURED.commit_round_trips_s + 0.2 - 0.0002)
    # and the restored ones come after any switchover recorded since
    _learn(after.of("vm-5", [BIG]), 0.05)
    assert after.of("vm-4", [BIG]).correct(MEASURED, device_bytes=0).commit_round_trips_s \
        == pytest.approx(MEASURED.commit_round_trips_s + 0.05 - 0.0002)


def test_the_snapshot_holds_only_what_was_learnt_and_is_stable() -> None:
    hosts = _host()
    hosts.of("never-migrated", [UART])
    doc = json.loads(encode(hosts))
    assert doc["version"] == 1
    assert [s["guest"] for s in doc["shapes"]] == ["vm1", "vm2"]
    assert encode(decode(encode(hosts))) == encode(hosts)


def test_a_series_longer_than_the_histories_keep_is_cut_to_its_newest() -> None:
    doc = json.loads(encode(_host()))
    doc["shapes"][0]["lessons"]["verify_extra"] = [0.001 * i for i in range(20)]
    h = decode(json.dumps(doc).encode()).of("vm1", [BIG])
    assert h.kept()["verify_extra"] == pytest.approx([0.001 * i for i in range(12, 20)])


def test_the_shapes_bound_holds_for_a_restored_snapshot() -> None:
    before = HostHistories()
    for i in range(5):
        _learn(before.of(f"vm{i}", [UART]), 0.001)
    after = decode(encode(before), into=HostHistories(shapes=3))
    assert [g for g, _, _ in after.shapes()] == ["vm2", "vm3", "vm4"]


def _damaged(edit: str) -> bytes:
    doc = json.loads(encode(_host()))
    shape = doc["shapes"][0]
    lessons, device = shape["lessons"], shape["devices"][0]
    exec(edit, {"doc": doc, "shape": shape, "lessons": lessons, "device": device})
    return json.dumps(doc).encode()


@pytest.mark.parametrize("edit, names", [
    ("doc['version'] = 2", "version 2, this vfiod reads version 1"),
    ("doc['shapes'] = {}", "shapes: {}, not a list"),
    ("del shape['guest']", "shapes[0].guest: missing or null, not a guest name"),
    ("device['flags'] = -1", "shapes[0].devices[0].flags: -1, not a count"),
    ("device['identity']['vendor'] = 5555", "shapes[0].devices[0].identity.vendor: 5555"),
    ("shape['migrations'] = True", "shapes[0].migrations: true, not a count"),
    ("lessons['guesses'] = []", "shapes[0].lessons: unknown series guesses"),
    ("lessons['sync_ratio'][0] = 250.0",
     "shapes[0].lessons.sync_ratio[0]: 250.0 is outside 0.01..100.0"),
    ("lessons['stop_per_byte'][0] = float('nan')",
     "shapes[0].lessons.stop_per_byte[0]: NaN, not a finite number"),
    ("lessons['commit_extra'][1] = [3]",
     "shapes[0].lessons.commit_extra[1]: [3], not [records, seconds]"),
    ("lessons['commit_extra'][1][1] = '0.1'",
     "shapes[0].lessons.commit_extra[1][1]: \"0.1\", not a finite number"),
    ("lessons['stream_end'] = 0.1", "shapes[0].lessons.stream_end: 0.1, not a list"),
])
def test_a_damaged_snapshot_names_what_is_wrong(edit: str, names: str) -> None:
    with pytest.raises(HistorySnapshotError) as e:
        decode(_damaged(edit))
    assert names in str(e.value)


@pytest.mark.parametrize("data, names", [
    (b"{\"version\": 1, \"shapes\": [", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[]", "the snapshot: [], not an object"),
    (b" " * (MAX_SNAPSHOT_BYTES + 1), f"more than the {MAX_SNAPSHOT_BYTES} bytes"),
])
def test_what_is_not_a_snapshot_is_refused(data: bytes, names: str) -> None:
    with pytest.raises(HistorySnapshotError) as e:
        decode(data)
    assert names in str(e.value)


def test_a_refused_snapshot_adds_nothing_to_the_histories() -> None:
    hosts = HostHistories()
    doc = json.loads(encode(_host()))
    doc["shapes"][1]["lessons"]["sync_ratio"] = [0.0]
    with pytest.raises(HistorySnapshotError):
        decode(json.dumps(doc).encode(), into=hosts)
    assert hosts.shapes() == []


def test_what_a_history_keeps_a_snapshot_restores_and_broken_clocks_are_not_kept() -> None:
    """A lesson record() kept but decode() refused would lose every lesson at the next
    restart: both hold to the same bounds."""
    hosts = HostHistories()
    h = hosts.of("vm1", [BIG])
    actual = {c: PREDICTED.get(c, 0.0) for c in COMPONENTS}
    # a 90 s commit and a device that took 20 s per MiB: clocks that broke
    h.record(MEASURED, PREDICTED, {**actual, "commit_round_trips": 90.0,
                                   "device_stop": 40.0, "dest_load_resume": 0.01}, 2 << 20)
    h.record_opted_out(1, 1, 1e-9)
    kept = h.kept()
    assert kept["commit_extra"] == [] and kept["stop_per_byte"] == []
    assert kept["opted_out_rate"] == []
    assert kept["load_per_byte"] != []                   # the sane one of the same record
    assert decode(encode(hosts)).of("vm1", [BIG]).kept() == kept
