"""The stream's HEADER record: who sends, the guest's memory layout, its devices.

docs/architecture.md §5 ("the header carries protocol version, source identity, guest layout and
device list"). The payload is UTF-8 JSON so that an operator can read it with ``jq`` from a
saved snapshot; it is small and bounded (``Limits.header``), and ``StreamHeader.from_json``
checks every field (types, alignment, overlaps, counts) before anything uses it, because
the destination sizes its memory checks from it.

Device entries carry what preflight compares (docs/architecture.md §1): the device's ``id``
(host-independent, the same in both hosts' configurations: the destination pairs each
entry with its own device of that id, docs/protocol.md §5.1), identity (vendor, device,
subsystem, driver, mdev type ... as strings), migration protocol (``v2``/``v1``), the
migration flags (v2 ``VFIO_MIGRATION_*`` bits as the kernel reports them) and capability
names (``PRE_COPY``, ``P2P``, ``DMA_LOGGING`` ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from vfiod.migration.stream.records import PROTOCOL_VERSION
from vfiod.vfio.layout import RamRegion

MAX_REGIONS = 4096
MAX_DEVICES = 1024
MAX_NAME = 256
#: RAM channels one migration may open (docs/protocol.md §12)
MAX_CHANNELS = 16
CHECKSUM_NAME = "crc32c"


@dataclass(frozen=True)
class DeviceInfo:
    """A migrating device as the source sees it (see the module docstring); ``id`` ""
    means its name."""

    name: str
    protocol: str
    flags: int = 0
    identity: dict[str, str] = field(default_factory=dict, hash=False)
    capabilities: tuple[str, ...] = ()
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", self.name)


@dataclass(frozen=True)
class StreamHeader:
    source_host: str
    migration_id: str
    guest: str
    page_size: int
    regions: tuple[RamRegion, ...]
    devices: tuple[DeviceInfo, ...]
    protocol: int = PROTOCOL_VERSION
    checksum: str = CHECKSUM_NAME
    software: str = "vfiod"
    #: the destination's challenge for this connection, answered (docs/protocol.md §8.4)
    challenge: str = ""
    #: connections carrying RAM: 1 = this one; N > 1 = N channels (docs/protocol.md §12)
    channels: int = 1
    #: the source waits for ACK pass after each ITERATION (docs/protocol.md §8.5)
    pass_acks: bool = False
    #: short runs of pages may travel in RAM_RUNS records (docs/protocol.md §5.4)
    ram_runs: bool = False

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def ram_bytes(self) -> int:
        return sum(r.size for r in self.regions)

    def device_index(self, name: str) -> int:
        for i, d in enumerate(self.devices):
            if d.name == name:
                return i
        raise KeyError(f"device {name!r} is not in the stream header")

    def to_json(self) -> bytes:
        doc = {
            "protocol": self.protocol,
            "checksum": self.checksum,
            "software": self.software,
            "pass_acks": self.pass_acks,
            **({"ram_runs": True} if self.ram_runs else {}),   # absent: as older sources wrote
            "source": {"host": self.source_host, "migration_id": self.migration_id,
                       "challenge": self.challenge},
            "guest": {
                "name": self.guest,
                "page_size": self.page_size,
                "regions": [{"name": r.name, "gpa": r.gpa, "size": r.size}
                            for r in self.regions],
            },
            "devices": [{"name": d.name, "id": d.id, "protocol": d.protocol,
                         "flags": d.flags,
                         "identity": dict(sorted(d.identity.items())),
                         "capabilities": list(d.capabilities)} for d in self.devices],
        }
        if self.channels > 1:      # absent on a single connection: its bytes are unchanged
            doc["channels"] = self.channels
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes | bytearray | memoryview) -> StreamHeader:
        """Parse and validate; raises ``ValueError`` saying which field is wrong."""
        try:
            doc = json.loads(bytes(payload).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"header is not UTF-8 JSON: {e}") from None
        d = _obj(doc, "header")
        src = _obj(d.get("source"), "source")
        guest = _obj(d.get("guest"), "guest")
        regions = tuple(
            RamRegion(_str(r.get("name"), f"guest.regions[{i}].name"),
                      _int(r.get("gpa"), f"guest.regions[{i}].gpa"),
                      _int(r.get("size"), f"guest.regions[{i}].size"))
            for i, r in enumerate(_objs(guest.get("regions"), "guest.regions", MAX_REGIONS)))
        devices = []
        for i, dev in enumerate(_objs(d.get("devices"), "devices", MAX_DEVICES)):
            ident = _obj(dev.get("identity", {}), f"devices[{i}].identity")
            caps = dev.get("capabilities", [])
            if not isinstance(caps, list) or len(caps) > 64:
                raise ValueError(f"devices[{i}].capabilities must be a list of names")
            devices.append(DeviceInfo(
                name=_str(dev.get("name"), f"devices[{i}].name"),
                id=_nonempty(dev.get("id"), f"devices[{i}].id"),
                protocol=_str(dev.get("protocol"), f"devices[{i}].protocol"),
                flags=_int(dev.get("flags", 0), f"devices[{i}].flags"),
                identity={_str(k, f"devices[{i}].identity key"):
                          _str(v, f"devices[{i}].identity[{k}]") for k, v in ident.items()},
                capabilities=tuple(_str(c, f"devices[{i}].capabilities[]") for c in caps)))
        return cls(
            source_host=_str(src.get("host"), "source.host"),
            migration_id=_str(src.get("migration_id"), "source.migration_id"),
            guest=_str(guest.get("name"), "guest.name"),
            page_size=_int(guest.get("page_size"), "guest.page_size"),
            regions=regions,
            devices=tuple(devices),
            protocol=_int(d.get("protocol"), "protocol"),
            checksum=_str(d.get("checksum"), "checksum"),
            software=_str(d.get("software", "vfiod"), "software"),
            challenge=_str(src.get("challenge", ""), "source.challenge"),
            channels=_int(d.get("channels", 1), "channels"),
            pass_acks=_bool(d.get("pass_acks", False), "pass_acks"),
            ram_runs=_bool(d.get("ram_runs", False), "ram_runs"),
        )


# -- validation ---------------------------------------------------------------------------

def _obj(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError(f"{what} must be an object")
    return v


def _objs(v: Any, what: str, bound: int) -> list[dict[str, Any]]:
    if not isinstance(v, list):
        raise ValueError(f"{what} must be a list")
    if len(v) > bound:
        raise ValueError(f"{what} has {len(v)} entries, at most {bound} allowed")
    return [_obj(x, f"{what}[{i}]") for i, x in enumerate(v)]


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str) or len(v) > MAX_NAME:
        raise ValueError(f"{what} must be a string of at most {MAX_NAME} characters")
    return v


def _bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{what} must be true or false, not {v!r}")
    return v


def _nonempty(v: Any, what: str) -> str:
    if not _str(v, what):
        raise ValueError(f"{what} must not be empty")
    return str(v)


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 1 << 64:
        raise ValueError(f"{what} must be an unsigned 64-bit integer, not {v!r}")
    return v


def _validate(h: StreamHeader) -> None:
    if h.protocol != PROTOCOL_VERSION:
        raise ValueError(f"protocol {h.protocol} is not {PROTOCOL_VERSION}")
    if h.checksum != CHECKSUM_NAME:
        raise ValueError(f"checksum {h.checksum!r} is not {CHECKSUM_NAME!r}")
    ps = h.page_size
    if ps < 4096 or ps > 1 << 30 or ps & (ps - 1):
        raise ValueError(f"guest.page_size {ps} is not a power of two in 4 KiB..1 GiB")
    if len(h.regions) > MAX_REGIONS or len(h.devices) > MAX_DEVICES:
        raise ValueError("too many regions or devices")
    names: set[str] = set()
    end = -1
    for r in sorted(h.regions, key=lambda r: r.gpa):
        if not r.name or r.name in names:
            raise ValueError(f"region name {r.name!r} is empty or repeated")
        names.add(r.name)
        if r.size <= 0 or r.gpa % ps or r.size % ps:
            raise ValueError(f"region {r.name}: gpa {r.gpa:#x} size {r.size:#x} must be "
                             f"positive multiples of the page size {ps:#x}")
        if r.gpa < end:
            raise ValueError(f"region {r.name} at {r.gpa:#x} overlaps the region before it")
        end = r.gpa + r.size
    if end > 1 << 64:
        raise ValueError("guest layout ends beyond 2^64")
    if not 1 <= h.channels <= MAX_CHANNELS:
        raise ValueError(f"channels {h.channels} is not between 1 and {MAX_CHANNELS}")
    seen: set[str] = set()
    ids: set[str] = set()
    for d in h.devices:
        if not d.name or d.name in seen:
            raise ValueError(f"device name {d.name!r} is empty or repeated")
        seen.add(d.name)
        if d.id in ids:      # never empty: DeviceInfo makes an empty id the name
            raise ValueError(f"device {d.name}: id {d.id!r} is repeated")
        ids.add(d.id)
        if d.protocol not in ("v1", "v2"):
            raise ValueError(f"device {d.name}: protocol {d.protocol!r} is not v1 or v2")
