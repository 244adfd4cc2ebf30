"""The durable journal: what this host decided about its guests and their migrations, on
disk before the action it allows (docs/architecture.md §1.8, §1.7).

``Journal.open(directory)`` reads ``<directory>/journal`` into a ``JournalState`` (each
guest's last lifecycle transition, the latest outcome of each migration id) for the
daemon's restart to replay; ``append_transition`` and ``append_outcome`` add one line each
and return only once it is fsynced. A failed write raises ``JournalError`` and leaves no
partial line behind (the file is cut back to its last whole line), so the caller does not
take the action and a later append, once the disk has room again, starts on a line
boundary. Line format and the torn-record rule: ``vfiod.daemon.journal_records``.
``write_s`` is the median time of the last ``TIMED_APPENDS`` appends (write and fsync):
the confirmed switchover writes several records inside the downtime, and its prediction
counts them at what this disk takes (docs/architecture.md §4).

Compaction keeps the file small: after ``compact_after`` records it is rewritten with
each guest's last transition and the records of the ``keep_ids`` most recent migration
ids (their latest outcome, or the last transition naming an id that has none, so
``seen`` still knows it), to ``journal.new``, fsynced and renamed over ``journal``. A
crash leaves one file or the other whole; a stale ``journal.new`` is removed at open.

Every file operation goes through a ``JournalFiles`` object, by default the durable-file
functions of ``vfiod.kernel.linux`` (the only module that makes syscalls), so a test can
make any of them fail.
"""

from __future__ import annotations

import errno
import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import vfiod.kernel.linux as linux_files
from vfiod.daemon.journal_records import (
    JournalError,
    JournalLineError,
    JournalRecord,
    MigrationOutcome,
    OutcomeRecord,
    decode_line,
    encode_line,
    io_failure,
)
from vfiod.daemon.lifecycle import LifecycleTransition

__all__ = ["Journal", "JournalError", "JournalFiles", "JournalState", "MigrationOutcome",
           "OutcomeRecord"]

log = logging.getLogger("vfiod.journal")

JOURNAL_NAME = "journal"
COMPACTING_NAME = "journal.new"
TIMED_APPENDS = 32


class JournalFiles(Protocol):
    """The file operations the journal needs (``vfiod.kernel.linux`` has them all)."""

    def make_private_dir(self, path: str) -> None: ...
    def read_file(self, path: str) -> bytes: ...
    def remove_file(self, path: str) -> bool: ...
    def open_append(self, path: str) -> int: ...
    def write_all_fsync(self, fd: int, data: bytes) -> None: ...
    def truncate_fsync(self, fd: int, size: int) -> None: ...
    def file_size(self, fd: int) -> int: ...
    def close_fd(self, fd: int) -> None: ...
    def write_file_fsync(self, path: str, data: bytes) -> None: ...
    def rename_fsync_dir(self, src: str, dst: str) -> None: ...


@dataclass(frozen=True)
class JournalState:
    """What the journal said when it was opened."""

    last: dict[str, LifecycleTransition]        # guest -> its last transition
    outcomes: dict[str, OutcomeRecord]          # migration id -> its latest outcome
    warnings: list[str]                         # what was ignored or repaired at open


#: A record with its journal line (kept so that compaction need not encode it again).
LineOfRecord = tuple[JournalRecord, bytes]


class JournalIndex:
    """The records that matter, each with its position in the file and its line (for
    compaction)."""

    def __init__(self, entries: Iterable[LineOfRecord] = ()) -> None:
        self.count = 0
        self.last: dict[str, tuple[int, LifecycleTransition, bytes]] = {}
        self.outcomes: dict[str, tuple[int, OutcomeRecord, bytes]] = {}
        self.id_transitions: dict[str, tuple[int, LifecycleTransition, bytes]] = {}
        for rec, line in entries:
            self.add(rec, line)

    def add(self, rec: JournalRecord, line: bytes) -> None:
        seq, self.count = self.count, self.count + 1
        if isinstance(rec, OutcomeRecord):
            self.outcomes[rec.migration_id] = (seq, rec, line)
            return
        self.last[rec.guest] = (seq, rec, line)
        if rec.migration_id:
            self.id_transitions[rec.migration_id] = (seq, rec, line)

    def seen(self, migration_id: str) -> bool:
        return migration_id in self.outcomes or migration_id in self.id_transitions

    def live(self, keep_ids: int) -> list[LineOfRecord]:
        """The records a compacted journal holds, in their original order."""
        recency: dict[str, int] = {}
        for table in (self.outcomes, self.id_transitions):
            for mid, (seq, _, _) in table.items():
                recency[mid] = max(seq, recency.get(mid, -1))
        kept = sorted(recency, key=recency.__getitem__, reverse=True)[:keep_ids]
        keep: dict[int, LineOfRecord] = {seq: (rec, line)
                                         for seq, rec, line in self.last.values()}
        for mid in kept:
            seq, rec, line = self.outcomes.get(mid) or self.id_transitions[mid]
            keep[seq] = (rec, line)
        return [keep[seq] for seq in sorted(keep)]


class Journal:
    """The journal file of one state directory; every method is thread-safe."""

    def __init__(self, directory: str, files: JournalFiles, compact_after: int,
                 keep_ids: int, clock: Callable[[], float] = time.perf_counter) -> None:
        if compact_after < 1 or keep_ids < 1:
            raise ValueError(f"journal: compact_after ({compact_after}) and keep_ids "
                             f"({keep_ids}) must be at least 1")
        self.path = os.path.join(directory, JOURNAL_NAME)
        self._compacting_path = os.path.join(directory, COMPACTING_NAME)
        self._files = files
        self._compact_after, self._keep_ids = compact_after, keep_ids
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._closed = False
        self._size = 0                 # bytes of whole, fsynced lines
        self._dirty = False            # a failed append may have left bytes past _size
        self._since = 0
        self._index = JournalIndex()
        self._clock = clock
        self._append_s: deque[float] = deque(maxlen=TIMED_APPENDS)
        # set between a compaction's rename and the reopen that adopts its result
        self._compacted: tuple[int, list[LineOfRecord]] | None = None
        self.state = JournalState({}, {}, [])

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, compact_after: int = 1000,
             keep_ids: int = 10000, files: JournalFiles | None = None,
             clock: Callable[[], float] = time.perf_counter) -> Journal:
        """Open (creating if needed) the journal under ``directory`` and read it;
        ``JournalError`` if it cannot be read or holds a corrupt record before its last.
        ``clock`` times the appends (``write_s``)."""
        journal = cls(os.fspath(directory), files or linux_files, compact_after, keep_ids,
                      clock)
        journal._load()
        return journal

    # -- reading ---------------------------------------------------------------------------
    def last(self, guest: str) -> LifecycleTransition | None:
        with self._lock:
            entry = self._index.last.get(guest)
            return entry[1] if entry else None

    def outcome(self, migration_id: str) -> OutcomeRecord | None:
        with self._lock:
            entry = self._index.outcomes.get(migration_id)
            return entry[1] if entry else None

    def seen(self, migration_id: str) -> bool:
        """Whether any record named this migration id (as far as compaction keeps ids)."""
        with self._lock:
            return self._index.seen(migration_id)

    def write_s(self) -> float:
        """The median time of the recent appends, written and fsynced; 0 before any."""
        with self._lock:
            return statistics.median(self._append_s) if self._append_s else 0.0

    @property
    def records_since_compaction(self) -> int:
        """Records appended since the last compaction (at open: the lines a compaction
        would drop), compared with ``compact_after``."""
        with self._lock:
            return self._since

    # -- writing ---------------------------------------------------------------------------
    def append_transition(self, record: LifecycleTransition) -> None:
        """Record a lifecycle transition, on disk when this returns (else JournalError)."""
        self._append(record)

    def append_outcome(self, record: OutcomeRecord) -> None:
        """Record a migration outcome, on disk when this returns (else JournalError)."""
        self._append(record)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    self._files.close_fd(fd)
                except OSError as e:
                    log.warning("journal %s: close: %s", self.path, e)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------
    def _append(self, record: JournalRecord) -> None:
        line = encode_line(record)
        with self._lock:
            fd = self._ensure_fd()
            if self._dirty:
                self._cut_back(fd)
            started = self._clock()
            try:
                self._files.write_all_fsync(fd, line)
            except OSError as e:
                self._dirty = True
                try:
                    self._cut_back(fd)
                except JournalError as cut:
                    log.error("%s (retried before the next append)", cut)
                raise io_failure(self.path, f"appending a {type(record).__name__}", e) from None
            self._append_s.append(self._clock() - started)
            self._size += len(line)
            self._index.add(record, line)
            self._since += 1
            if self._since >= self._compact_after:
                self._compact()

    def _cut_back(self, fd: int) -> None:
        """Drop what a failed append left past the last whole line."""
        try:
            self._files.truncate_fsync(fd, self._size)
        except OSError as e:
            raise io_failure(self.path, f"cutting a failed append back to {self._size} "
                                        "bytes", e) from None
        self._dirty = False

    def _ensure_fd(self) -> int:
        if self._closed:
            raise JournalError(f"journal {self.path} is closed", self.path)
        if self._fd is None:
            try:
                fd = self._files.open_append(self.path)
                size = self._files.file_size(fd)
            except OSError as e:
                raise io_failure(self.path, "opening", e) from None
            self._fd, self._size = fd, size
            if self._compacted is not None:
                # the compaction's rename took effect iff the file has its size (if both
                # files have that size, nothing was dropped and they hold the same lines)
                length, live = self._compacted
                self._compacted = None
                if size == length:
                    self._index = JournalIndex(live)
        return self._fd

    def _compact(self) -> None:
        """Rewrite the journal with only its live records; a failure is logged and the
        journal goes on growing until the next try, ``compact_after`` records later."""
        self._since = 0
        live = self._index.live(self._keep_ids)
        data = b"".join(line for _, line in live)
        try:
            self._files.write_file_fsync(self._compacting_path, data)
        except OSError as e:
            log.warning("%s; the journal stays as it is", io_failure(
                self._compacting_path, "compacting", e))
            self._remove_compacting()
            return
        try:
            self._files.rename_fsync_dir(self._compacting_path, self.path)
        except OSError as e:
            log.warning("%s", io_failure(self.path, "replacing it with its compacted copy", e))
            self._remove_compacting()
        # The fd may now point at the replaced file: reopen the path, whichever file it is.
        fd, self._fd = self._fd, None
        self._compacted = (len(data), live)
        try:
            if fd is not None:
                self._files.close_fd(fd)
            self._ensure_fd()
        except (OSError, JournalError) as e:
            log.error("%s (retried at the next append)", e)

    def _remove_compacting(self) -> None:
        try:
            self._files.remove_file(self._compacting_path)
        except OSError as e:
            log.warning("journal %s: removing it: %s", self._compacting_path, e)

    def _load(self) -> None:
        files, warnings = self._files, []
        try:
            files.make_private_dir(os.path.dirname(self.path))
            if files.remove_file(self._compacting_path):
                warnings.append(f"removed {self._compacting_path}, left by a compaction that "
                                f"did not finish ({self.path} holds every record)")
        except OSError as e:
            raise io_failure(self.path, "preparing its directory", e) from None
        try:
            data = files.read_file(self.path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise io_failure(self.path, "reading", e) from None
            data = b""
        good = self._parse(data, warnings)
        for w in warnings:
            log.warning("%s", w)
        fd = self._ensure_fd()
        if self._size > good:
            self._size = good
            self._cut_back(fd)
        self._since = self._index.count - len(self._index.live(self._keep_ids))
        self.state = JournalState({g: e[1] for g, e in self._index.last.items()},
                                  {m: e[1] for m, e in self._index.outcomes.items()},
                                  warnings)

    def _parse(self, data: bytes, warnings: list[str]) -> int:
        """Index every whole record of ``data``; returns the size of the good part."""
        lines = data.split(b"\n")
        tail = lines.pop()           # b"" when the file ends with a newline
        offset = 0
        for number, line in enumerate(lines, 1):
            try:
                self._index.add(decode_line(line), line + b"\n")
            except JournalLineError as e:
                if not (e.torn and number == len(lines) and not tail):
                    raise JournalError(f"journal {self.path}:{number}: {e}; vfiod does not "
                                       "start on a journal it cannot read whole", self.path,
                                       ) from None
                warnings.append(f"journal {self.path}:{number}: the last record is torn "
                                f"({e}): ignored and cut off")
                return offset
            offset += len(line) + 1
        if tail:
            warnings.append(f"journal {self.path}:{len(lines) + 1}: the last record has no "
                            f"newline (a write that did not finish; {tail[:40]!r}): ignored "
                            "and cut off")
        return offset
