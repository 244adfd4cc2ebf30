"""The device identity record (``save_state`` / ``check_state``; docs/architecture.md §1 step 5
preflight "device identity and migration flags", docs/kernel-contract.md §6.2): a small JSON object a
source writes before its device data and a destination checks before it loads anything.

``encode_record`` names the device, its protocol and its VFIO_MIGRATION_* flags plus any
protocol extras; ``decode_record`` refuses anything that is not such a record (size,
encoding, version, field types) with ``ProtocolError``; ``compare_records`` lists every
field that differs, device names aside (they differ between hosts).
"""

from __future__ import annotations

import json

from vfiod.errors import ProtocolError

__all__ = ["encode_record", "decode_record", "compare_records"]

_RECORD_KEY = "vfiod_device_record"
_RECORD_VERSION = 1
_RECORD_MAX = 4096


def encode_record(name: str, protocol: str, flags: int, **extra: int | str | bool) -> bytes:
    rec: dict[str, object] = {_RECORD_KEY: _RECORD_VERSION, "name": name,
                              "protocol": protocol, "flags": flags}
    rec.update(extra)
    return json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()


def decode_record(record: bytes | memoryview) -> dict[str, object]:
    raw = bytes(record)
    if len(raw) > _RECORD_MAX:
        raise ProtocolError(f"device record: {len(raw)} bytes, more than {_RECORD_MAX}")
    try:
        rec = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"device record: not a vfiod device record ({e})") from None
    if not isinstance(rec, dict) or rec.get(_RECORD_KEY) != _RECORD_VERSION:
        raise ProtocolError(f"device record: missing {_RECORD_KEY}={_RECORD_VERSION}")
    for key, typ in (("name", str), ("protocol", str), ("flags", int)):
        if not isinstance(rec.get(key), typ):
            raise ProtocolError(f"device record: field {key!r} missing or not {typ.__name__}")
    return rec


def compare_records(mine: dict[str, object], theirs: dict[str, object]) -> list[str]:
    """Reasons the source device (``theirs``) cannot be loaded into this one (``mine``).
    Device names differ between hosts and are not compared."""
    reasons = []
    for key in sorted(set(mine) | set(theirs)):
        if key in (_RECORD_KEY, "name"):
            continue
        a, b = theirs.get(key), mine.get(key)
        if a != b:
            fa = f"{a:#x}" if key == "flags" and isinstance(a, int) else repr(a)
            fb = f"{b:#x}" if key == "flags" and isinstance(b, int) else repr(b)
            reasons.append(f"{key}: source {theirs.get('name')} has {fa}, "
                           f"destination {mine.get('name')} has {fb}")
    return reasons
