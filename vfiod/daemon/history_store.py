"""The daemon's switchover histories, kept across restarts (docs/architecture.md §1.8,
§4 "Earlier switchovers").

A daemon's predictions correct what no migration can measure before its own switchover
(the devices' stop and load, the commit's waits) with what earlier switchovers on this
host took. Those lessons used to live only in the process, so every restart (an
upgrade, a reload of the unit) predicted like a host that had never migrated. The store
reads ``<state directory>/switchover-history.json`` at start and rewrites it after each
outgoing migration (``history_snapshot`` is the format), with a durable replace: written
to ``switchover-history.json.new``, fsynced, renamed over the file, the directory fsynced.

The lessons only tune predictions; no guest's ownership depends on them. So, unlike the
journal, a file that cannot be read or restored does not stop the start: the daemon logs
what was wrong (``warning``), starts without the lessons, and the next save replaces the
file. A save that fails (a full or read-only disk) is logged, its partial
``.new`` file removed, and changes nothing else: the file keeps the last saved lessons.
Every file operation goes through ``files``, by default ``vfiod.kernel.linux``'s (the only
module that makes syscalls), so a test can make any of them fail.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterable
from typing import Protocol

import vfiod.kernel.linux as linux_files
from vfiod.errors import KernelError
from vfiod.migration.session.history import HOST_HISTORY, HostHistories, SwitchoverHistory
from vfiod.migration.session.history_snapshot import (
    MAX_SNAPSHOT_BYTES,
    HistorySnapshotError,
    decode,
    encode,
)
from vfiod.migration.stream.header import DeviceInfo

log = logging.getLogger("vfiod.history")

HISTORY_NAME = "switchover-history.json"


class HistoryFiles(Protocol):
    """The file operations the store needs (``vfiod.kernel.linux`` has them)."""

    def read_file(self, path: str, limit: int | None = None) -> bytes: ...
    def write_file_fsync(self, path: str, data: bytes) -> None: ...
    def rename_fsync_dir(self, src: str, dst: str) -> None: ...
    def remove_file(self, path: str) -> bool: ...


class HistoryStore:
    """``histories`` (default: the process's, ``HOST_HISTORY``) and where they are kept
    (``path``; None: in this process only)."""

    def __init__(self, histories: HostHistories = HOST_HISTORY, path: str | None = None,
                 files: HistoryFiles = linux_files) -> None:
        self.histories, self.path, self._files = histories, path, files
        #: why the file was not restored at open ("" if it was, or there was none)
        self.warning = ""
        self._save_lock = threading.Lock()

    @classmethod
    def open(cls, state_dir: str, files: HistoryFiles = linux_files) -> HistoryStore:
        """The histories kept under ``state_dir``; none if there is no file yet, or if
        it cannot be read or restored (then ``warning`` says why, and the log)."""
        path = os.path.join(state_dir, HISTORY_NAME)
        store = cls(HostHistories(), path, files)
        try:
            data = files.read_file(path, MAX_SNAPSHOT_BYTES)
        except KernelError as e:
            if e.errno != errno.ENOENT:
                store._discard(f"cannot read it: {e.strerror}")
            return store
        try:
            decode(data, into=store.histories)     # adds nothing if it raises
        except HistorySnapshotError as e:
            store._discard(str(e))
            return store
        shapes = len(store.histories.shapes())
        log.info("switchover history %s: %d guest shape%s restored", store.path, shapes,
                 "" if shapes == 1 else "s")
        return store

    def _discard(self, why: str) -> None:
        self.warning = why
        log.warning("switchover history %s: %s; predictions start without earlier "
                    "switchovers, and the next migration's save replaces the file",
                    self.path, why)

    def of(self, guest: str, devices: Iterable[DeviceInfo]) -> SwitchoverHistory:
        return self.histories.of(guest, devices)

    def save(self) -> bool:
        """Write the histories to ``path`` durably; False (logged) if that failed, and
        the file as it was. Migrations ending together save one after the other."""
        if self.path is None:
            return True
        with self._save_lock:
            data, tmp = encode(self.histories), self.path + ".new"
            try:
                self._files.write_file_fsync(tmp, data)
                self._files.rename_fsync_dir(tmp, self.path)
            except KernelError as e:
                log.warning("switchover history %s not saved: %s: %s; the daemon keeps "
                            "the lessons until it stops", self.path, e.op, e.strerror)
                try:
                    self._files.remove_file(tmp)     # no half-written file left behind
                except KernelError:
                    pass                             # the next save truncates it
                return False
        return True
