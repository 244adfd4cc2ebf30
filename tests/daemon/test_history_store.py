"""The daemon keeps its switchover histories across restarts (docs/architecture.md §1.8,
§4 "Earlier switchovers"): the finding "a restarted daemon predicts like one that never
migrated". A file that cannot be read or restored is reported and replaced, never a
reason not to start; a save on a full disk changes nothing and leaves nothing behind.
Failures are a real full tmpfs (this tier runs as root) or injected through ``files=``."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import vfiod.kernel.linux as linux_files
from tests.support.daemons import child_env, vfiod_cmd, wait_until
from tests.support.fault_rig import RigGuest, fill_disk, mount_tmpfs, started_pair, unmount
from vfiod.daemon.history_store import HISTORY_NAME, HistoryStore
from vfiod.errors import KernelError
from vfiod.migration.planning.breakdown import COMPONENTS
from vfiod.migration.planning.predictor import FixedCosts
from vfiod.migration.session.history import HostHistories
from vfiod.migration.session.history_snapshot import MAX_SNAPSHOT_BYTES
from vfiod.migration.stream.header import DeviceInfo

DEV = DeviceInfo("0000:3b:00.0", "v2", 7, {"vendor": "0x15b3", "device": "0x101e"})
MEASURED = FixedCosts(device_stop_s=0.001, commit_round_trips_s=0.0002)


def _learnt(hosts: HostHistories, guest: str = "vm1", commit_s: float = 0.004) -> None:
    parts = {c: 0.001 for c in COMPONENTS}
    hosts.of(guest, [DEV]).record(MEASURED, parts, {**parts, "commit_round_trips": commit_s},
                                  2 << 20)


def _commit(store: HistoryStore, guest: str = "vm1") -> float:
    return store.of(guest, [DEV]).correct(MEASURED, device_bytes=2 << 20).commit_round_trips_s


def test_no_file_yet_is_no_history_and_no_warning(tmp_path: Path) -> None:
    store = HistoryStore.open(str(tmp_path))
    assert (store.histories.shapes(), store.warning) == ([], "")
    assert _commit(store) == MEASURED.commit_round_trips_s


def test_saved_lessons_are_there_after_a_reopen(tmp_path: Path) -> None:
    store = HistoryStore.open(str(tmp_path))
    _learnt(store.histories)
    assert store.save()
    path = tmp_path / HISTORY_NAME
    assert path.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / (HISTORY_NAME + ".new")).exists()
    again = HistoryStore.open(str(tmp_path))
    assert again.warning == ""
    assert _commit(again) == pytest.approx(0.004 - 0.001 + MEASURED.commit_round_trips_s)
    assert again.of("vm1", [DEV]).lessons()["history_switchovers"] == 1.0


def test_a_damaged_file_is_reported_and_replaced_by_the_next_save(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = HistoryStore.open(str(tmp_path))
    _learnt(first.histories)
    first.save()
    path = tmp_path / HISTORY_NAME
    doc = json.loads(path.read_bytes())
    doc["shapes"][0]["lessons"]["sync_ratio"] = [1e9]
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, "vfiod.history"):
        store = HistoryStore.open(str(tmp_path))
    assert "shapes[0].lessons.sync_ratio[0]: 1000000000.0 is outside" in store.warning
    assert store.histories.shapes() == []                      # nothing half-restored
    assert str(path) in caplog.text and "start without earlier switchovers" in caplog.text
    _learnt(store.histories, "vm2")
    assert store.save()
    reread = HistoryStore.open(str(tmp_path))
    assert reread.warning == ""
    assert [g for g, _, _ in reread.histories.shapes()] == ["vm2"]


class _Files:
    """``vfiod.kernel.linux``'s file functions, with one of them failing."""

    def __init__(self, failing: str, err: int) -> None:
        self.failing, self.err = failing, err

    def __getattr__(self, name: str) -> object:
        real = getattr(linux_files, name)

        def call(*args: object) -> object:
            if name == self.failing:
                raise KernelError(self.err, f"{name}({args[0]})")
            return real(*args)
        return call


def test_an_unreadable_file_is_reported_and_the_daemon_starts_without_it(
        tmp_path: Path) -> None:
    (tmp_path / HISTORY_NAME).write_text("{}")
    store = HistoryStore.open(str(tmp_path), files=_Files("read_file", errno.EACCES))
    assert store.warning == "cannot read it: Permission denied"
    assert store.histories.shapes() == []


def test_a_file_too_large_to_be_ours_is_refused_without_reading_it_all(
        tmp_path: Path) -> None:
    path = tmp_path / HISTORY_NAME
    with open(path, "wb") as f:
        f.truncate(1 << 30)                 # 1 GiB of holes: no snapshot is that large
    read: list[int] = []

    class _Counting:
        def __getattr__(self, name: str) -> object:
            return getattr(linux_files, name)

        def read_file(self, p: str, limit: int | None = None) -> bytes:
            data = linux_files.read_file(p, limit)
            read.append(len(data))
            return data
    store = HistoryStore.open(str(tmp_path), files=_Counting())
    assert store.warning == f"more than the {MAX_SNAPSHOT_BYTES} bytes a snapshot can be"
    assert read == [MAX_SNAPSHOT_BYTES + 1]
    assert store.histories.shapes() == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "state"
    mnt.mkdir()
    mount_tmpfs(mnt, 64 * 1024)
    try:
        yield mnt
    finally:
        unmount(mnt)


def test_a_save_on_a_full_disk_keeps_the_last_file_and_leaves_nothing_behind(
        small_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = HistoryStore.open(str(small_disk))
    _learnt(store.histories)
    assert store.save()
    saved = (small_disk / HISTORY_NAME).read_bytes()
    filler = fill_disk(small_disk)
    for i in range(40):       # more than the last blocks the filler could not take
        _learnt(store.histories, f"vm{i + 2}")
    with caplog.at_level(logging.WARNING, "vfiod.history"):
        assert not store.save()
    assert "not saved" in caplog.text and "No space left on device" in caplog.text
    assert (small_disk / HISTORY_NAME).read_bytes() == saved
    assert sorted(os.listdir(small_disk)) == sorted([HISTORY_NAME, filler.name])
    filler.unlink()
    assert store.save()                                        # room again: saved
    assert len(HistoryStore.open(str(small_disk)).histories.shapes()) == 41


def test_a_failed_rename_keeps_the_last_file(tmp_path: Path) -> None:
    store = HistoryStore.open(str(tmp_path))
    _learnt(store.histories)
    store.save()
    saved = (tmp_path / HISTORY_NAME).read_bytes()
    _learnt(store.histories, "vm2")
    store._files = _Files("rename_fsync_dir", errno.EIO)
    assert not store.save()
    assert (tmp_path / HISTORY_NAME).read_bytes() == saved
    assert os.listdir(tmp_path) == [HISTORY_NAME]


G = RigGuest("g1", 1)


def test_a_restarted_source_predicts_with_the_switchovers_it_learnt_before() -> None:
    """Two daemons: the guest goes a -> b -> a, a restarts, and its next migration's
    prediction is corrected by its switchover before the restart (without the file it
    had none: ``prediction_lessons`` 0, as its first migration's)."""
    with started_pair([G]) as pair:
        a, b = pair.src, pair.dst

        def moved(src, dst) -> dict:  # type: ignore[no-untyped-def]
            src.migrate(G.name, dst.migration_address)
            wait_until(lambda: (src.guest_state(G.name), dst.guest_state(G.name))
                       == ("incoming", "running"), 60, f"{G.name} to move to {dst.name}")
            m = src.migration(G.name)
            assert m is not None and m["result"] == "completed", m
            return m

        first = moved(a, b)
        assert first["prediction_lessons"] == {"switchovers": 0, "borrowed": False}
        # saved when a's session thread ends, just after the guest moved
        wait_until((a.root / "state" / HISTORY_NAME).exists, 60, "a to save its history")
        moved(b, a)
        a.sigterm()
        a.start()
        assert "1 guest shape restored" in a.log()
        after = moved(a, b)
        assert after["prediction_lessons"] == {"switchovers": 1, "borrowed": False}


def test_a_damaged_file_is_shown_by_status_and_the_daemon_still_migrates() -> None:
    """The warning is in ``ctl status`` (JSON and text), not only in the log, and the
    daemon runs and migrates without the lessons, then saves a good file."""
    with started_pair([G]) as pair:
        a, b = pair.src, pair.dst
        assert a.status()["daemon"]["history_warning"] is None
        a.sigterm()
        path = a.root / "state" / HISTORY_NAME
        path.write_text('{"version": 7, "shapes": []}')
        a.start()
        assert a.status()["daemon"]["history_warning"] == \
            "version 7, this vfiod reads version 1"
        text = subprocess.run(vfiod_cmd("ctl", "--socket", a.socket, "status"),
                              capture_output=True, text=True, env=child_env(), timeout=60)
        assert text.returncode == 0, text.stderr
        assert ("switchover history not restored (predictions start without it): "
                "version 7, this vfiod reads version 1") in text.stdout
        a.migrate(G.name, b.migration_address)
        wait_until(lambda: b.guest_state(G.name) == "running", 60, f"{G.name} to run on b")
        # saved once the source's session thread has ended, after the guest moved; the
        # rename replaces the file whole, so a read sees the old one or the new one
        wait_until(lambda: json.loads(path.read_text())["version"] == 1, 60,
                   "the source to save a good history file")
