"""A host's switchover histories as bytes, and back (docs/architecture.md §4 "Earlier
switchovers"; §1.8: a daemon keeps them across restarts).

``encode`` writes one JSON object:

    {"version": 1,
     "shapes": [{"guest": NAME,
                 "devices": [{"protocol": "v2", "flags": 11, "identity": {KEY: VALUE}}],
                 "migrations": N, "recorded": ORDER,
                 "lessons": {SERIES: [VALUE, ...], "commit_extra": [[RECORDS, SECONDS]]}}]}

the shapes least recently used first, ``recorded`` the rank of their last switchover
(1 the oldest, 0 none: which kin is the latest). ``decode`` checks every field and
raises ``HistorySnapshotError`` naming the first one wrong
(``shapes[2].lessons.sync_ratio[0]: ...``), having added nothing: the lessons only tune
predictions, so the daemon says what was wrong and starts without them rather than
predict from a damaged file. Values outside ``LESSON_BOUNDS`` (the bounds ``record``
keeps lessons within) are damage, not lessons; a series longer than the histories keep
is cut to its newest values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from vfiod.errors import VfiodError
from vfiod.migration.session.history import (
    LESSON_BOUNDS,
    SERIES,
    DeviceKind,
    HostHistories,
    SwitchoverHistory,
)

VERSION = 1
#: larger than 256 shapes of full series can be: a bigger file is not one we wrote
MAX_SNAPSHOT_BYTES = 8 << 20
_MAX_RECORDS = 1 << 32


class HistorySnapshotError(VfiodError):
    """A snapshot that cannot be restored; the message names what is wrong."""


def encode(histories: HostHistories) -> bytes:
    kept = [(guest, kind, h, {k: v for k, v in h.kept().items() if v})
            for guest, kind, h in histories.shapes()]
    kept = [s for s in kept if s[2].migrations or s[3]]
    # the switchovers' order as ranks 1..N (0: none): this process's counter means
    # nothing to the next one
    ranks = {id(h): n for n, h in enumerate(sorted(
        (h for _, _, h, _ in kept if h.migrations), key=lambda h: h.recorded_at), 1)}
    shapes = [{"guest": guest,
               "devices": [{"protocol": p, "flags": f, "identity": dict(ident)}
                           for p, f, ident in kind],
               "migrations": h.migrations, "recorded": ranks.get(id(h), 0),
               "lessons": lessons}
              for guest, kind, h, lessons in kept]
    return (json.dumps({"version": VERSION, "shapes": shapes}, separators=(",", ":"),
                       sort_keys=True) + "\n").encode()


def decode(data: bytes, into: HostHistories | None = None) -> HostHistories:
    """The histories ``data`` holds, added to ``into`` (a new ``HostHistories`` if None)
    once every field is checked: on ``HistorySnapshotError`` nothing was added."""
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise HistorySnapshotError(f"more than the {MAX_SNAPSHOT_BYTES} bytes a snapshot "
                                   "can be")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise HistorySnapshotError(f"not JSON: {e}") from None
    top = _object(doc, "the snapshot")
    if top.get("version") != VERSION:
        raise HistorySnapshotError(f"version {top.get('version')!r}, this vfiod reads "
                                   f"version {VERSION}")
    shapes = top.get("shapes")
    if not isinstance(shapes, list):
        raise HistorySnapshotError(f"shapes: {_kind_of(shapes)}, not a list")
    hosts = into if into is not None else HostHistories()
    restored = [_shape(s, f"shapes[{i}]", hosts.keep_per_series)
                for i, s in enumerate(shapes)]
    # keep() in the switchovers' order (which kin is the latest), adopt in the use order
    histories = {}
    for n, shape in sorted(enumerate(restored), key=lambda item: item[1].recorded):
        h = SwitchoverHistory(hosts.keep_per_series)
        h.keep(shape.lessons, shape.migrations)
        histories[n] = h
    for n, shape in enumerate(restored):
        hosts.adopt(shape.guest, shape.kind, histories[n])
    return hosts


@dataclass(frozen=True)
class _Shape:
    guest: str
    kind: DeviceKind
    migrations: int
    recorded: int
    lessons: dict[str, list[object]]


def _shape(doc: Any, where: str, keep: int) -> _Shape:
    s = _object(doc, where)
    guest = s.get("guest")
    if not isinstance(guest, str) or not guest:
        raise HistorySnapshotError(f"{where}.guest: {_kind_of(guest)}, not a guest name")
    devices = s.get("devices")
    if not isinstance(devices, list):
        raise HistorySnapshotError(f"{where}.devices: {_kind_of(devices)}, not a list")
    kind = tuple(_device(d, f"{where}.devices[{i}]") for i, d in enumerate(devices))
    migrations = _count(s.get("migrations"), f"{where}.migrations")
    recorded = _count(s.get("recorded"), f"{where}.recorded")
    lessons = _object(s.get("lessons"), f"{where}.lessons")
    unknown = sorted(set(lessons) - set(SERIES))
    if unknown:
        raise HistorySnapshotError(f"{where}.lessons: unknown series {', '.join(unknown)}")
    checked = {name: _series(name, values, f"{where}.lessons.{name}")[-keep:]
               for name, values in lessons.items()}
    return _Shape(guest, kind, migrations, recorded, checked)


def _device(doc: Any, where: str) -> tuple[str, int, tuple[tuple[str, str], ...]]:
    d = _object(doc, where)
    protocol, flags, identity = d.get("protocol"), d.get("flags"), d.get("identity")
    if not isinstance(protocol, str) or not protocol:
        raise HistorySnapshotError(f"{where}.protocol: {_kind_of(protocol)}, not a protocol")
    ident = _object(identity, f"{where}.identity")
    for k, v in ident.items():
        if not isinstance(v, str):
            raise HistorySnapshotError(f"{where}.identity.{k}: {_kind_of(v)}, not a string")
    return protocol, _count(flags, f"{where}.flags"), tuple(sorted(ident.items()))


def _series(name: str, values: Any, where: str) -> list[object]:
    if not isinstance(values, list):
        raise HistorySnapshotError(f"{where}: {_kind_of(values)}, not a list")
    lo, hi = LESSON_BOUNDS[name]
    out: list[object] = []
    for i, v in enumerate(values):
        at = f"{where}[{i}]"
        if name == "commit_extra":
            if not isinstance(v, list) or len(v) != 2:
                raise HistorySnapshotError(f"{at}: {_kind_of(v)}, not [records, seconds]")
            records = _count(v[0], f"{at}[0]")
            if records >= _MAX_RECORDS:
                raise HistorySnapshotError(f"{at}[0]: {records} records, too many")
            out.append([records, _number(v[1], f"{at}[1]", lo, hi)])
        else:
            out.append(_number(v, at, lo, hi))
    return out


def _number(v: Any, where: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise HistorySnapshotError(f"{where}: {_kind_of(v)}, not a finite number")
    if not lo <= v <= hi:
        raise HistorySnapshotError(f"{where}: {v!r} is outside {lo!r}..{hi!r}")
    return float(v)


def _count(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise HistorySnapshotError(f"{where}: {_kind_of(v)}, not a count (an integer >= 0)")
    return v


def _object(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise HistorySnapshotError(f"{where}: {_kind_of(v)}, not an object")
    return v


def _kind_of(v: Any) -> str:
    """A value as an error names it: short, and its JSON type when that is the fault."""
    if v is None:
        return "missing or null"
    text = json.dumps(v)
    return text if len(text) <= 40 else f"{type(v).__name__} {text[:37]}..."
