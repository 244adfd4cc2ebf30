"""What the journal holds, one line per record, and how a line is written and read back
(docs/architecture.md §1.8; the journal itself is ``vfiod.daemon.journal``).

A line is ``<crc32c> <json>\\n``: the CRC-32C of the JSON bytes as 8 lowercase hex digits
(``journal_crc``: without numba, whose first call costs a daemon 15 MiB), one space, the
record as compact JSON with ``"kind"`` (``transition`` or ``outcome``) and ``"v": 1``, and
a newline. Two kinds of record:

* a ``LifecycleTransition`` (``vfiod.daemon.lifecycle``): one guest's step, e.g.
  switching-over → migrated-away;
* an ``OutcomeRecord``: what one side decided or did about one migration id, written
  before the action it allows (``MigrationOutcome`` says which, and when it is written).

Reading a line tells two failures apart (``JournalLineError.torn``): a line whose checksum
or shape is wrong was torn by a crash or a failing disk and may be dropped if it is the
last one; a line whose checksum is right but whose content this vfiod does not know (a
newer version, an unknown kind) was written on purpose, and is never dropped.
"""

from __future__ import annotations

import enum
import errno
import json
import os
from dataclasses import dataclass
from typing import Any

from vfiod.daemon.journal_crc import journal_crc32c
from vfiod.daemon.lifecycle import LifecycleTransition
from vfiod.errors import VfiodError

#: The ``"v"`` of every line this vfiod writes, and the only one it reads.
JOURNAL_FORMAT_VERSION = 1

#: Which side of a migration wrote an outcome.
ROLES = ("source", "destination")


class MigrationOutcome(enum.StrEnum):
    """What one side of a migration decided or did (docs/architecture.md §1.7)."""

    #: source: decided to commit; written before it sends COMMIT.
    COMMITTED = "committed"
    #: source: rolled back before committing (the guest runs on the source again).
    ROLLED_BACK = "rolled-back"
    #: destination: loaded and verified; written before it answers PREPARED.
    PREPARED = "prepared"
    #: destination: resumed on COMMIT, written before it resumes the devices;
    #: source: the peer confirmed that it resumed.
    RESUMED = "resumed"
    #: destination: discarded what it received (never ran the guest).
    DISCARDED = "discarded"
    #: destination: restarted while prepared; the restart reset its devices' state.
    LOST = "lost"


class JournalError(VfiodError):
    """The journal could not record something, or could not be read at start.

    A write or fsync failed (``errno`` set: ENOSPC, EIO, EROFS...): the record is not on
    disk, so the action it was to allow must not be taken. Or a record that is not the last
    line is corrupt or unknown: the daemon refuses to start rather than guess who owns a
    guest. The message names the journal's path (and line).
    """

    def __init__(self, message: str, path: str, err: int | None = None) -> None:
        self.path = path
        self.errno = err
        super().__init__(message)


class JournalLineError(ValueError):
    """One line could not be read; ``torn`` is True when its shape or checksum is wrong
    (a write that did not finish), False when a whole record says something unknown."""

    def __init__(self, why: str, torn: bool) -> None:
        self.torn = torn
        super().__init__(why)


@dataclass(frozen=True, slots=True)
class OutcomeRecord:
    """One side's outcome of one migration, as a journal line holds it."""

    migration_id: str
    guest: str
    role: str                        # "source" | "destination" (ROLES)
    outcome: MigrationOutcome
    peer: str = ""
    at: float = 0.0                  # wall clock (time.time)
    detail: str = ""

    def __post_init__(self) -> None:
        if not self.migration_id:
            raise ValueError(f"outcome record for guest {self.guest!r} has no migration id")
        if not self.guest:
            raise ValueError(f"outcome record of migration {self.migration_id} has no guest")
        if self.role not in ROLES:
            raise ValueError(f"outcome record of migration {self.migration_id}: role "
                             f"{self.role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(self.outcome, MigrationOutcome):
            raise ValueError(f"outcome record of migration {self.migration_id}: outcome "
                             f"{self.outcome!r} is not a MigrationOutcome")

    def to_json(self) -> dict[str, Any]:
        return {"migration_id": self.migration_id, "guest": self.guest, "role": self.role,
                "outcome": self.outcome.value, "peer": self.peer, "at": self.at,
                "detail": self.detail}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OutcomeRecord:
        """Read one record back; ``ValueError`` names what is missing or unknown."""
        try:
            outcome = d["outcome"]
            if outcome not in MigrationOutcome._value2member_map_:
                raise ValueError(f"outcome record {d!r}: unknown outcome {outcome!r} "
                                 f"(known: {', '.join(MigrationOutcome)})")
            return cls(str(d["migration_id"]), str(d["guest"]), str(d["role"]),
                       MigrationOutcome(outcome), str(d.get("peer", "")),
                       float(d.get("at", 0.0)), str(d.get("detail", "")))
        except KeyError as e:
            raise ValueError(f"outcome record {d!r} has no {e.args[0]!r}") from None

    def describe(self) -> str:
        peer = f", peer {self.peer}" if self.peer else ""
        detail = f": {self.detail}" if self.detail else ""
        return (f"migration {self.migration_id} of guest {self.guest}: {self.role} "
                f"{self.outcome}{peer}{detail}")


#: Either kind of journal record.
JournalRecord = LifecycleTransition | OutcomeRecord

_KINDS: dict[str, type[LifecycleTransition] | type[OutcomeRecord]] = {
    "transition": LifecycleTransition, "outcome": OutcomeRecord}


def encode_line(record: JournalRecord) -> bytes:
    """The journal line of ``record``, newline included."""
    kind = "transition" if isinstance(record, LifecycleTransition) else "outcome"
    body = json.dumps({"kind": kind, "v": JOURNAL_FORMAT_VERSION, **record.to_json()},
                      separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    return b"%08x %s\n" % (journal_crc32c(body), body)


def _is_lower_hex(b: bytes) -> bool:
    return all(c in b"0123456789abcdef" for c in b)


def decode_line(line: bytes) -> JournalRecord:
    """The record on one line (without its newline); ``JournalLineError`` says what is
    wrong and whether the line looks torn."""
    if len(line) < 10 or line[8:9] != b" " or not _is_lower_hex(line[:8]):
        raise JournalLineError(f"not '<crc32c> <json>' ({line[:40]!r})", torn=True)
    body = line[9:]
    said, has = int(line[:8], 16), journal_crc32c(body)
    if said != has:
        raise JournalLineError(f"bad checksum (the line says {said:08x}, its content has "
                               f"{has:08x})", torn=True)
    try:
        d = json.loads(body)
    except ValueError as e:
        # the checksum matched, so this vfiod (or another) wrote it so: not torn
        raise JournalLineError(f"not JSON ({e})", torn=False) from None
    if not isinstance(d, dict):
        raise JournalLineError(f"not a JSON object ({body[:40]!r})", torn=False)
    if d.get("v") != JOURNAL_FORMAT_VERSION:
        raise JournalLineError(f"unknown version {d.get('v')!r} (this vfiod reads "
                               f"{JOURNAL_FORMAT_VERSION})", torn=False)
    kind = d.get("kind")
    if kind not in _KINDS:
        raise JournalLineError(f"unknown kind {kind!r} (known: {', '.join(_KINDS)})",
                               torn=False)
    try:
        return _KINDS[kind].from_json(d)
    except (ValueError, TypeError) as e:
        raise JournalLineError(f"bad {kind} record: {e}", torn=False) from None


def io_failure(path: str, doing: str, e: OSError) -> JournalError:
    """The ``JournalError`` for a failed read, write or fsync, naming the path and errno."""
    err = e.errno
    text = f"{os.strerror(err)} ({errno.errorcode.get(err, err)})" if err else str(e)
    return JournalError(f"journal {path}: {doing}: {text}", path, err)
