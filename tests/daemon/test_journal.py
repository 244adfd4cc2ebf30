"""The durable journal (docs/architecture.md §1.8): records survive a reopen; each append is
fsynced before it returns; a torn last line is ignored, reported and cut off, a corrupt
earlier one refuses the start; a full disk raises ``JournalError`` and leaves no partial
line; compaction keeps what replay needs and survives a failure at any step; threads
append whole lines. Failures of each file operation are injected through ``files=``; the
full disk is a real 64 KiB tmpfs (this tier runs as root)."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vfiod.kernel.linux as linux_files
from vfiod.daemon.journal import (
    TIMED_APPENDS,
    Journal,
    JournalError,
    MigrationOutcome,
    OutcomeRecord,
)
from vfiod.daemon.journal_records import decode_line, encode_line
from vfiod.daemon.lifecycle import LifecycleState, LifecycleTransition
from vfiod.errors import KernelError

S = LifecycleState
O = MigrationOutcome  # noqa: E741 - short name for the table-like tests


def step(guest: str, frm: S, to: S, mid: str = "", at: float = 1.0) -> LifecycleTransition:
    return LifecycleTransition(guest, frm, to, f"{frm} to {to}", mid, "host-b:4600" if mid
                               else "", at)


def outcome(mid: str, what: MigrationOutcome, guest: str = "g1", role: str = "source",
            at: float = 2.0) -> OutcomeRecord:
    return OutcomeRecord(mid, guest, role, what, "host-b:4600", at, f"{what} by test")


def lines(journal_dir: Path) -> list[bytes]:
    data = (journal_dir / "journal").read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"journal ends mid-line: {data[-60:]!r}"
    return data.splitlines()


class FailingFiles:
    """The real durable-file functions, except those named in ``fail`` (name -> errno),
    which raise after doing ``partial`` of their job (a short write, a rename that
    happened before its directory fsync failed)."""

    def __init__(self, **fail: int) -> None:
        self.fail = dict(fail)
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        real = getattr(linux_files, name)

        def call(*args: Any) -> Any:
            self.calls.append(name)
            err = self.fail.get(name)
            if err is None:
                return real(*args)
            if name == "write_all_fsync":      # half the line reaches the file
                os.write(args[0], args[1][:len(args[1]) // 2])
            if name == "write_file_fsync":     # half the file is written
                Path(args[0]).write_bytes(args[1][:len(args[1]) // 2])
            if name == "rename_fsync_dir" and err == errno.EIO:   # the dir fsync failed
                os.rename(*args)
            raise KernelError(err, name, str(args[0]))
        return call


# -- records -----------------------------------------------------------------------------------

def test_both_kinds_of_record_survive_a_reopen(tmp_path: Path) -> None:
    recs = [step("g1", S.DEFINED, S.CLAIMED), step("g1", S.CLAIMED, S.RUNNING),
            step("g1", S.RUNNING, S.MIGRATING_OUT, "m-1"), outcome("m-1", O.COMMITTED),
            step("g2", S.LOADED, S.PREPARED, "m-2"),
            outcome("m-2", O.PREPARED, "g2", "destination")]
    with Journal.open(tmp_path / "state") as j:
        for r in recs:
            (j.append_outcome if isinstance(r, OutcomeRecord) else j.append_transition)(r)
        assert j.last("g1") == recs[2] and j.outcome("m-1") == recs[3]
    assert [decode_line(line) for line in lines(tmp_path / "state")] == recs
    with Journal.open(tmp_path / "state") as j:
        assert j.state.last == {"g1": recs[2], "g2": recs[4]}
        assert j.state.outcomes == {"m-1": recs[3], "m-2": recs[5]}
        assert j.state.warnings == []
        assert j.last("g2") == recs[4] and j.outcome("m-2") == recs[5]
        assert j.last("g3") is None and j.outcome("m-3") is None


def test_a_line_is_crc32c_hex_then_compact_json() -> None:
    line = encode_line(outcome("m-1", O.RESUMED))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    crc, body = line[:-1].split(b" ", 1)
    assert len(crc) == 8 and crc == crc.lower()
    assert b'"kind":"outcome"' in body and b'"v":1' in body and b", " not in body


@pytest.mark.parametrize("d, says", [
    ({"guest": "g1", "role": "source", "outcome": "resumed"}, "has no 'migration_id'"),
    ({"migration_id": "m", "guest": "g1", "role": "source", "outcome": "won"},
     "unknown outcome 'won'"),
    ({"migration_id": "m", "guest": "g1", "role": "bystander", "outcome": "lost"},
     "role 'bystander' is not one of source, destination"),
])
def test_an_outcome_record_names_what_is_wrong(d: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        OutcomeRecord.from_json(d)


def test_an_outcome_record_round_trips_through_json() -> None:
    rec = outcome("m-9", O.LOST, "g4", "destination")
    assert OutcomeRecord.from_json(rec.to_json()) == rec


# -- fsync before return -------------------------------------------------------------------------

def test_append_writes_then_fsyncs_the_line_before_returning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = Journal.open(tmp_path, files=(files := FailingFiles()))
    files.calls.clear()
    syscalls: list[tuple[str, int]] = []
    real_write, real_fsync = os.write, os.fsync
    monkeypatch.setattr(os, "write", lambda fd, b: (syscalls.append(("write", fd)),
                                                    real_write(fd, b))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (syscalls.append(("fsync", fd)),
                                                 real_fsync(fd))[1])
    j.append_outcome(outcome("m-1", O.COMMITTED))
    monkeypatch.undo()
    assert files.calls == ["write_all_fsync"]
    assert [op for op, _ in syscalls] == ["write", "fsync"]     # the fsync is the last step
    assert syscalls[0][1] == syscalls[1][1]                     # of the journal's own fd
    assert len(lines(tmp_path)) == 1
    j.close()


class SlowFiles(FailingFiles):
    """Each append's write and fsync takes the next of ``takes`` seconds of ``clock``."""

    def __init__(self, clock: list[float], takes: list[float], **fail: int) -> None:
        super().__init__(**fail)
        self.clock, self.takes = clock, takes

    def __getattr__(self, name: str) -> Any:
        call = super().__getattr__(name)
        if name != "write_all_fsync":
            return call

        def timed(*args: Any) -> Any:
            self.clock[0] += self.takes.pop(0)
            return call(*args)
        return timed


def test_write_s_is_the_median_time_of_the_recent_appends(tmp_path: Path) -> None:
    now = [100.0]
    files = SlowFiles(now, [0.001, 0.009, 0.002, 0.5])
    j = Journal.open(tmp_path, files=files, clock=lambda: now[0])
    assert j.write_s() == 0.0                           # nothing measured yet
    for i, mid in enumerate(("m-1", "m-2", "m-3")):
        j.append_outcome(outcome(mid, O.COMMITTED))
        assert j.write_s() == pytest.approx([0.001, 0.005, 0.002][i])
    files.fail["write_all_fsync"] = errno.ENOSPC       # a failed append is no sample
    with pytest.raises(JournalError):
        j.append_outcome(outcome("m-4", O.COMMITTED))
    assert j.write_s() == pytest.approx(0.002)
    j.close()


def test_write_s_keeps_only_the_recent_appends(tmp_path: Path) -> None:
    now = [0.0]
    slow, fast = [1.0] * TIMED_APPENDS, [0.001] * (TIMED_APPENDS // 2 + 1)
    j = Journal.open(tmp_path, files=SlowFiles(now, slow + fast), clock=lambda: now[0])
    for i in range(len(slow) + len(fast)):
        j.append_outcome(outcome(f"m-{i}", O.COMMITTED))
    assert j.write_s() == pytest.approx(0.001)          # the slow start has aged out
    j.close()


def test_the_directory_is_made_private(tmp_path: Path) -> None:
    Journal.open(tmp_path / "a" / "state").close()
    assert (tmp_path / "a" / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "a" / "state" / "journal").stat().st_mode & 0o777 == 0o600


# -- torn and corrupt lines ----------------------------------------------------------------------

def _two_records(d: Path) -> list[LifecycleTransition]:
    recs = [step("g1", S.DEFINED, S.CLAIMED), step("g1", S.CLAIMED, S.RUNNING)]
    with Journal.open(d) as j:
        for r in recs:
            j.append_transition(r)
    return recs


@pytest.mark.parametrize("tail, says", [
    (encode_line(step("g1", S.RUNNING, S.MIGRATING_OUT, "m-1"))[:37], "has no newline"),
    (b"0000abcd" + encode_line(step("g1", S.RUNNING, S.MIGRATING_OUT, "m-1"))[8:],
     "bad checksum"),
    (b"\0" * 50 + b"\n", "not '<crc32c> <json>'"),
], ids=["no-newline", "bad-crc", "zeros"])
def test_a_torn_last_line_is_ignored_reported_and_cut_off(
        tmp_path: Path, tail: bytes, says: str, caplog: pytest.LogCaptureFixture) -> None:
    recs = _two_records(tmp_path)
    good = (tmp_path / "journal").stat().st_size
    with (tmp_path / "journal").open("ab") as f:
        f.write(tail)
    with Journal.open(tmp_path) as j:
        assert j.state.last == {"g1": recs[1]}
        assert len(j.state.warnings) == 1 and says in j.state.warnings[0]
        assert f"{tmp_path / 'journal'}:3" in j.state.warnings[0]
        assert says in caplog.text
        assert (tmp_path / "journal").stat().st_size == good
        nxt = step("g1", S.RUNNING, S.MIGRATING_OUT, "m-2")
        j.append_transition(nxt)
    with Journal.open(tmp_path) as j:
        assert j.state.warnings == [] and j.state.last == {"g1": nxt}


@pytest.mark.parametrize("bad, says", [
    (b"0000abcd" + encode_line(step("g1", S.RUNNING, S.MIGRATING_OUT, "m-1"))[8:],
     "bad checksum"),
    (b"garbage\n", "not '<crc32c> <json>'"),
])
def test_a_corrupt_line_before_the_last_refuses_the_start(
        tmp_path: Path, bad: bytes, says: str) -> None:
    recs = _two_records(tmp_path)
    (tmp_path / "journal").write_bytes(bad + encode_line(recs[0]) + encode_line(recs[1]))
    with pytest.raises(JournalError, match=f"{tmp_path / 'journal'}:1: {says}"):
        Journal.open(tmp_path)


def test_a_whole_record_of_an_unknown_kind_is_never_dropped_even_last(tmp_path: Path) -> None:
    # the checksum is right, so it was written on purpose (by a newer vfiod): refuse, keep it
    from vfiod.migration.stream.crc32c import crc32c
    _two_records(tmp_path)
    body = b'{"kind":"vote","v":1}'
    before = (tmp_path / "journal").read_bytes() + b"%08x %s\n" % (crc32c(body), body)
    (tmp_path / "journal").write_bytes(before)
    with pytest.raises(JournalError, match=r"journal:3: unknown kind 'vote'"):
        Journal.open(tmp_path)
    assert (tmp_path / "journal").read_bytes() == before


# -- failed appends ------------------------------------------------------------------------------

def test_a_failed_append_leaves_no_partial_line_and_appends_work_again(tmp_path: Path) -> None:
    files = FailingFiles(write_all_fsync=errno.EIO)
    j = Journal.open(tmp_path, files=files)
    with pytest.raises(JournalError, match=rf"{tmp_path / 'journal'}: .*Input/output error"):
        j.append_outcome(outcome("m-1", O.COMMITTED))
    assert lines(tmp_path) == [] and j.outcome("m-1") is None
    del files.fail["write_all_fsync"]
    j.append_outcome(rec := outcome("m-1", O.ROLLED_BACK))
    assert [decode_line(line) for line in lines(tmp_path)] == [rec]
    j.close()


def test_a_cut_back_that_fails_is_retried_before_the_next_append(tmp_path: Path) -> None:
    files = FailingFiles(write_all_fsync=errno.EIO, truncate_fsync=errno.EIO)
    j = Journal.open(tmp_path, files=files)
    with pytest.raises(JournalError):
        j.append_outcome(outcome("m-1", O.COMMITTED))
    assert (tmp_path / "journal").read_bytes()               # the half line is still there
    del files.fail["write_all_fsync"]
    with pytest.raises(JournalError, match="cutting a failed append back to 0 bytes"):
        j.append_outcome(outcome("m-1", O.ROLLED_BACK))     # never written after the half
    del files.fail["truncate_fsync"]
    j.append_outcome(rec := outcome("m-1", O.ROLLED_BACK))
    assert [decode_line(line) for line in lines(tmp_path)] == [rec]
    j.close()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a disk that fills up (mounting needs root, which this tier has)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        # lazy: a failed test may still hold the journal's fd open until it is collected
        subprocess.run(["umount", "--lazy", str(mnt)], check=True)


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_full_disk_raises_and_leaves_whole_lines(small_tmpfs: Path) -> None:
    state = small_tmpfs / "state"
    sizes_at_failure: list[int] = []

    class Watching(FailingFiles):
        def write_all_fsync(self, fd: int, data: bytes) -> None:
            try:
                linux_files.write_all_fsync(fd, data)
            except KernelError:
                sizes_at_failure.append(os.fstat(fd).st_size)
                raise

    j = Journal.open(state, files=Watching())
    written = [outcome(f"m-{i}", O.PREPARED, role="destination") for i in range(3)]
    for rec in written:
        j.append_outcome(rec)
    _fill(small_tmpfs / "filler")
    with pytest.raises(JournalError) as err:
        for i in range(3, 1000):      # the journal's last page has some room left
            j.append_outcome(rec := outcome(f"m-{i}", O.PREPARED, role="destination"))
            written.append(rec)
    assert str(state / "journal") in str(err.value) and "No space left" in str(err.value)
    assert err.value.errno == errno.ENOSPC and err.value.path == str(state / "journal")
    good = sum(len(encode_line(r)) for r in written)
    assert sizes_at_failure and sizes_at_failure[0] > good   # it did stop mid-line...
    assert [decode_line(line) for line in lines(state)] == written   # ...and was cut back
    (small_tmpfs / "filler").unlink()
    j.append_outcome(last := outcome("m-x", O.RESUMED, role="destination"))
    j.close()
    with Journal.open(state) as j:
        assert j.state.warnings == []
        assert list(j.state.outcomes.values()) == [*written, last]


# -- compaction ----------------------------------------------------------------------------------

def _history(n_ids: int) -> list[LifecycleTransition | OutcomeRecord]:
    """Three guests migrating back and forth: many superseded records."""
    recs: list[LifecycleTransition | OutcomeRecord] = []
    for i in range(n_ids):
        g, mid = f"g{i % 3}", f"m-{i}"
        recs += [step(g, S.RUNNING, S.MIGRATING_OUT, mid, i),
                 step(g, S.MIGRATING_OUT, S.SWITCHING_OVER, mid, i),
                 outcome(mid, O.COMMITTED, g, at=i),
                 step(g, S.SWITCHING_OVER, S.MIGRATED_AWAY, mid, i),
                 outcome(mid, O.RESUMED, g, at=i)]
    return recs


def _append_all(j: Journal, recs: list[LifecycleTransition | OutcomeRecord]) -> None:
    for r in recs:
        if isinstance(r, OutcomeRecord):
            j.append_outcome(r)
        else:
            j.append_transition(r)


def _model(recs: list[LifecycleTransition | OutcomeRecord]) -> tuple[dict, dict]:
    last = {r.guest: r for r in recs if isinstance(r, LifecycleTransition)}
    outcomes = {r.migration_id: r for r in recs if isinstance(r, OutcomeRecord)}
    return last, outcomes


def test_compaction_keeps_each_guests_last_step_and_the_latest_outcomes(tmp_path: Path) -> None:
    recs = _history(8)                        # 40 records
    j = Journal.open(tmp_path, compact_after=40, keep_ids=100)
    _append_all(j, recs[:-1])
    assert len(lines(tmp_path)) == 39 and j.records_since_compaction == 39
    big = (tmp_path / "journal").stat().st_size
    _append_all(j, recs[-1:])                 # the 40th record compacts
    assert j.records_since_compaction == 0
    assert (tmp_path / "journal").stat().st_size < big
    assert len(lines(tmp_path)) == 3 + 8      # three guests' last steps, eight outcomes
    last, outcomes = _model(recs)
    assert {g: j.last(g) for g in last} == last
    assert {m: j.outcome(m) for m in outcomes} == outcomes
    j.append_transition(nxt := step("g0", S.MIGRATED_AWAY, S.DEFINED))   # into the new file
    j.close()
    with Journal.open(tmp_path) as j:
        assert j.state.last == {**last, "g0": nxt} and j.state.outcomes == outcomes
        assert j.state.warnings == [] and j.records_since_compaction == 1   # g0's old step


def test_compaction_keeps_only_the_most_recent_ids(tmp_path: Path) -> None:
    recs = _history(10)
    with Journal.open(tmp_path, compact_after=len(recs), keep_ids=4) as j:
        _append_all(j, recs)
        assert [m for m in (f"m-{i}" for i in range(10)) if j.seen(m)] == [
            "m-6", "m-7", "m-8", "m-9"]
    with Journal.open(tmp_path) as j:
        assert sorted(j.state.outcomes) == ["m-6", "m-7", "m-8", "m-9"]
        assert j.state.last == _model(recs)[0]


def test_an_id_named_only_by_transitions_is_still_seen_after_compaction(tmp_path: Path) -> None:
    # an incoming migration that failed before any outcome: its id must still be refused
    recs = [step("g1", S.INCOMING, S.LOADED, "m-failed"), step("g1", S.LOADED, S.DEFINED),
            step("g1", S.DEFINED, S.CLAIMED)]
    with Journal.open(tmp_path, compact_after=3) as j:
        _append_all(j, recs)
        assert j.seen("m-failed")
    with Journal.open(tmp_path) as j:
        assert j.seen("m-failed") and not j.seen("m-other")
        assert j.state.last == {"g1": recs[-1]}


def test_the_count_at_open_is_the_lines_a_compaction_would_drop(tmp_path: Path) -> None:
    with Journal.open(tmp_path) as j:
        _append_all(j, _history(2))           # 10 records, 2 guests + 2 outcomes live
    with Journal.open(tmp_path, compact_after=7) as j:
        assert j.records_since_compaction == 6
        j.append_transition(step("g9", S.DEFINED, S.CLAIMED))   # 7: compacts
        assert j.records_since_compaction == 0 and len(lines(tmp_path)) == 5


def test_a_stale_compaction_file_is_removed_at_open(tmp_path: Path) -> None:
    recs = _two_records(tmp_path)
    (tmp_path / "journal.new").write_bytes(b"0000 half a compacted journ")
    with Journal.open(tmp_path) as j:
        assert j.state.last == {"g1": recs[1]}
        assert "journal.new" in j.state.warnings[0]
        assert not (tmp_path / "journal.new").exists()


@pytest.mark.parametrize("fail", [
    {"write_file_fsync": errno.ENOSPC},       # the compacted copy could not be written
    {"rename_fsync_dir": errno.EXDEV},        # ... nor renamed: the old file stays
    {"rename_fsync_dir": errno.EIO},          # renamed, then the directory fsync failed
])
def test_a_failed_compaction_loses_nothing(tmp_path: Path, fail: dict[str, int],
                                           caplog: pytest.LogCaptureFixture) -> None:
    recs = _history(4)
    ids = [f"m-{i}" for i in range(4)]
    j = Journal.open(tmp_path, compact_after=len(recs) - 1, keep_ids=2,
                     files=FailingFiles(**fail))
    _append_all(j, recs)                      # every append returned: each record is on disk
    assert "compacted" in caplog.text or "compacting" in caplog.text
    assert not (tmp_path / "journal.new").exists()
    j.append_transition(nxt := step("g0", S.MIGRATED_AWAY, S.DEFINED))   # lands in `journal`
    seen = [m for m in ids if j.seen(m)]
    # m-0 is dropped if and only if the compacted file replaced the journal
    assert ("m-0" in seen) == (fail.get("rename_fsync_dir") != errno.EIO)
    j.close()
    last, outcomes = _model([*recs, nxt])
    with Journal.open(tmp_path, keep_ids=2) as j:
        assert j.state.last == last and j.state.warnings == []
        kept = ids[2:] if fail.get("rename_fsync_dir") == errno.EIO else ids
        assert j.state.outcomes == {m: outcomes[m] for m in kept}
        assert [m for m in ids if j.seen(m)] == seen          # what it said before the close


# -- threads, reopen, close ----------------------------------------------------------------------

@pytest.mark.parametrize("compact_after", [10_000, 25])
def test_threads_append_whole_lines(tmp_path: Path, compact_after: int) -> None:
    j = Journal.open(tmp_path, compact_after=compact_after)
    per_thread = 60

    def worker(n: int) -> None:
        for i in range(per_thread):
            j.append_outcome(outcome(f"t{n}-{i}", O.PREPARED, f"g{n}", "destination"))
            j.append_transition(step(f"g{n}", S.LOADED, S.PREPARED, f"t{n}-{i}", i))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    j.close()
    recs = [decode_line(line) for line in lines(tmp_path)]      # every line whole
    if compact_after == 10_000:
        assert len(recs) == 4 * per_thread * 2
    with Journal.open(tmp_path) as j:
        assert len(j.state.outcomes) == 4 * per_thread
        assert {g: r.migration_id for g, r in j.state.last.items()} == {
            f"g{n}": f"t{n}-{per_thread - 1}" for n in range(4)}


def test_seen_survives_a_reopen(tmp_path: Path) -> None:
    with Journal.open(tmp_path) as j:
        j.append_transition(step("g1", S.INCOMING, S.LOADED, "m-in"))
        j.append_outcome(outcome("m-out", O.COMMITTED))
    with Journal.open(tmp_path) as j:
        assert j.seen("m-in") and j.seen("m-out") and not j.seen("m-new")


def test_a_closed_journal_refuses_appends(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    j.close()
    with pytest.raises(JournalError, match="is closed"):
        j.append_transition(step("g1", S.DEFINED, S.CLAIMED))
