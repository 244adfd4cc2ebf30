"""The final MANIFEST record: per-region and per-device tallies the destination verifies.

docs/architecture.md §5: "a final manifest (per-region digests, byte counts) lets the destination prove
nothing was lost". Both ends keep a ``Tally`` per RAM region and per device, fed one entry
per record (never per page): the record's sequence number, its two arguments, its data
length (for RAM: the page bytes, without the CRC table) and its payload CRC (for RAM: the
CRC of the per-page CRC table, so the digest covers every page's checksum). The digest is BLAKE2b-128 over those 32-byte entries, so it is
incremental and costs one small hash update per record rather than a second pass over the
data; together with every record's own CRC it proves that the destination received the
same records, in the same order, with the same bytes, as the source sent.

The source sends its tallies in the MANIFEST; the reader compares them with its own and, on
a difference, raises ``RecordError(code=MANIFEST, region=<name>)`` naming the region or
device and what differs.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

_ENTRY = struct.Struct("<IQQQI")  # seq, arg0, arg1, length, payload crc (32 bytes)
DIGEST_SIZE = 16


@dataclass
class Tally:
    """Running count of the records, bytes and digest of one region or device."""

    records: int = 0
    bytes: int = 0
    _hash: Any = field(default_factory=lambda: hashlib.blake2b(digest_size=DIGEST_SIZE))

    def add(self, seq: int, arg0: int, arg1: int, length: int, crc: int) -> None:
        self.records += 1
        self.bytes += length
        self._hash.update(_ENTRY.pack(seq & 0xFFFFFFFF, arg0, arg1, length, crc))

    def entry(self, name: str) -> ManifestEntry:
        return ManifestEntry(name, self.records, self.bytes, self._hash.hexdigest())


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    records: int
    bytes: int
    digest: str


@dataclass(frozen=True)
class Manifest:
    """What the source sent: one entry per RAM region and per device, in header order,
    ``records``, the number of records before the MANIFEST itself, and with RAM channels
    one entry per channel, in channel order (its RAM records; docs/protocol.md §12)."""

    ram: tuple[ManifestEntry, ...]
    devices: tuple[ManifestEntry, ...]
    records: int
    channels: tuple[ManifestEntry, ...] = ()

    @property
    def ram_bytes(self) -> int:
        return sum(e.bytes for e in self.ram) + sum(e.bytes for e in self.channels)

    @property
    def device_bytes(self) -> int:
        return sum(e.bytes for e in self.devices)

    def to_json(self) -> bytes:
        def ent(e: ManifestEntry) -> dict[str, Any]:
            return {"name": e.name, "records": e.records, "bytes": e.bytes, "digest": e.digest}
        doc = {"ram": [ent(e) for e in self.ram], "devices": [ent(e) for e in self.devices],
               "records": self.records}
        if self.channels:           # absent on a single connection: its bytes are unchanged
            doc["channels"] = [ent(e) for e in self.channels]
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes | bytearray | memoryview) -> Manifest:
        """Parse; raises ``ValueError`` saying which field is wrong."""
        try:
            doc = json.loads(bytes(payload).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"manifest is not UTF-8 JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError("manifest must be an object")

        def entries(key: str, default: Any = None) -> tuple[ManifestEntry, ...]:
            lst = doc.get(key, default)
            if not isinstance(lst, list):
                raise ValueError(f"manifest.{key} must be a list")
            out = []
            for i, e in enumerate(lst):
                if not (isinstance(e, dict) and isinstance(e.get("name"), str)
                        and _is_count(e.get("records")) and _is_count(e.get("bytes"))
                        and isinstance(e.get("digest"), str)):
                    raise ValueError(f"manifest.{key}[{i}] needs name, records, bytes, digest")
                out.append(ManifestEntry(e["name"], e["records"], e["bytes"], e["digest"]))
            return tuple(out)

        records = doc.get("records")
        if not _is_count(records):
            raise ValueError("manifest.records must be a count")
        return cls(entries("ram"), entries("devices"), int(records),  # type: ignore[arg-type]
                   entries("channels", []))


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64


def first_difference(sent: Manifest, received: Manifest) -> tuple[str, str] | None:
    """(region or device name, what differs) for the first mismatch, or None if equal."""
    for kind, a_list, b_list in (("RAM region", sent.ram, received.ram),
                                 ("device", sent.devices, received.devices),
                                 ("channel", sent.channels, received.channels)):
        if len(a_list) != len(b_list):
            return (f"{kind}s", f"the source lists {len(a_list)}, the destination has "
                                f"{len(b_list)}")
        for a, b in zip(a_list, b_list, strict=True):
            if a.name != b.name:
                return (b.name, f"the source lists {kind} {a.name!r} in its place")
            if a.records != b.records or a.bytes != b.bytes:
                return (a.name, f"{kind} {a.name}: source sent {a.records} records / "
                                f"{a.bytes} bytes, destination received {b.records} "
                                f"records / {b.bytes} bytes")
            if a.digest != b.digest:
                return (a.name, f"{kind} {a.name}: digest {a.digest} sent, {b.digest} "
                                "received")
    if sent.records != received.records:
        return ("stream", f"source sent {sent.records} records before the manifest, "
                          f"destination read {received.records}")
    return None
