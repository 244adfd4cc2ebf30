"""Preflight: may this guest migrate from the source host to the destination host?

docs/architecture.md §1 step 5. Each side describes itself as ``MigrationFacts`` (its ``HostFacts``
from ``hostfacts.gather_host_facts`` plus ``GuestFacts``: the guest as the source runs it,
or as the destination is configured to receive it). ``compare(source, dest)`` returns every
reason to refuse, as sentences an operator can act on (empty list = go);
``check(source, dest)`` raises ``PreflightError`` with all of them. The facts travel between
daemons as JSON (``to_json``/``from_json``).

Refusals, in the order they are reported:

* stream protocol versions differ;
* the guest uses memory encryption (SEV, SEV-ES, SEV-SNP, TDX): its RAM is ciphertext to the
  host, so vfiod would send garbage; refuse, naming the technology;
* the destination CPU's x86-64 ABI level is below the source's (the guest may already use
  the missing instructions), listing the missing flags;
* the destination cannot pin the guest's memory: RLIMIT_MEMLOCK headroom below the bytes
  to pin and no CAP_IPC_LOCK, with the advice to set ``LimitMEMLOCK=`` in the unit;
* host or guest page sizes differ;
* the guest memory layouts differ (regions by guest address and size);
* the devices do not pair up: devices are paired by their ``id`` (host-independent, the
  same in both hosts' configurations; PCI addresses differ between hosts, and the order
  the configurations list them in may differ too), never by position. A device on one
  side only, an id listed twice on one side, or a pair that differs in identity
  (vendor, device, subsystem ...), migration protocol or migration flags is a refusal
  naming the id and both device names. A device configured without an id has its name
  as id, so it pairs only with a device of the same name; the refusal says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from vfiod.errors import PreflightError
from vfiod.migration.planning.hostfacts import (
    AbiLevel,
    CpuFacts,
    HostFacts,
    MemlockFacts,
    SevFacts,
    flags_up_to,
)
from vfiod.migration.stream.header import DeviceInfo
from vfiod.migration.stream.records import PROTOCOL_VERSION
from vfiod.vfio import RamRegion

ENCRYPTION_NAMES = {"sev": "AMD SEV", "sev-es": "AMD SEV-ES", "sev-snp": "AMD SEV-SNP",
                    "tdx": "Intel TDX"}


@dataclass(frozen=True)
class GuestFacts:
    name: str
    page_size: int
    regions: tuple[RamRegion, ...]
    devices: tuple[DeviceInfo, ...]
    pinned_bytes: int                 # bytes VFIO will pin for DMA (normally all RAM)
    memory_encryption: str = "none"   # "none" or a key of ENCRYPTION_NAMES


@dataclass(frozen=True)
class MigrationFacts:
    host: HostFacts
    guest: GuestFacts
    protocol_version: int = PROTOCOL_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["host"]["cpu"]["flags"] = sorted(self.host.cpu.flags)
        d["host"]["cpu"]["abi_level"] = int(self.host.cpu.abi_level)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MigrationFacts:
        """Parse the peer's facts; ``ValueError`` if they do not have the expected shape."""
        try:
            d = json.loads(text)
            h, g, c = d["host"], d["guest"], d["host"]["cpu"]
            host = HostFacts(
                hostname=str(h["hostname"]),
                cpu=CpuFacts(str(c["vendor"]), str(c["model"]), frozenset(c["flags"]),
                             AbiLevel(int(c["abi_level"]))),
                sev=SevFacts(**h["sev"]),
                memlock=MemlockFacts(**h["memlock"]),
                page_size=int(h["page_size"]))
            guest = GuestFacts(
                name=str(g["name"]), page_size=int(g["page_size"]),
                regions=tuple(RamRegion(**r) for r in g["regions"]),
                # an older peer sends no id: its devices pair by name, and the protocol
                # versions differ anyway, which compare() reports
                devices=tuple(DeviceInfo(name=v["name"], protocol=v["protocol"],
                                         flags=int(v["flags"]), identity=dict(v["identity"]),
                                         capabilities=tuple(v["capabilities"]),
                                         id=str(v.get("id") or v["name"]))
                              for v in g["devices"]),
                pinned_bytes=int(g["pinned_bytes"]),
                memory_encryption=str(g["memory_encryption"]))
            return cls(host, guest, int(d["protocol_version"]))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"peer preflight facts are malformed: {type(e).__name__}: {e}"
                             ) from None


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _encryption(src: MigrationFacts, dst: MigrationFacts) -> list[str]:
    out = []
    for side, f in (("source", src), ("destination", dst)):
        enc = f.guest.memory_encryption
        if enc != "none":
            name = ENCRYPTION_NAMES.get(enc, enc)
            out.append(f"guest {f.guest.name} uses {name} memory encryption ({side} "
                       "configuration): its RAM is ciphertext to the host, so it cannot be "
                       "migrated by copying pages")
    return out


def _abi(src: HostFacts, dst: HostFacts) -> list[str]:
    s, d = src.cpu.abi_level, dst.cpu.abi_level
    if d >= s:
        return []
    missing = sorted(flags_up_to(s) - dst.cpu.flags)
    return [f"destination CPU {dst.hostname} is {d.label}, below the source's {s.label}: "
            f"it lacks {' '.join(missing)}, which the guest may already use"]


def _memlock(src: MigrationFacts, dst: MigrationFacts) -> list[str]:
    room = dst.host.memlock.headroom()
    need = max(src.guest.pinned_bytes, dst.guest.pinned_bytes)
    if room is None or need <= room:
        return []
    m = dst.host.memlock
    return [f"destination {dst.host.hostname} can lock {_gib(room)} more "
            f"(RLIMIT_MEMLOCK {_gib(m.soft or 0)}, {_gib(m.locked)} locked, no CAP_IPC_LOCK) "
            f"but the guest needs {_gib(need)} pinned for device DMA: set "
            f"LimitMEMLOCK=infinity (or at least {need}) in the vfiod unit, or grant "
            "CAP_IPC_LOCK"]


def _pages(src: MigrationFacts, dst: MigrationFacts) -> list[str]:
    out = []
    if src.host.page_size != dst.host.page_size:
        out.append(f"host page size differs: source {src.host.page_size}, destination "
                   f"{dst.host.page_size}")
    if src.guest.page_size != dst.guest.page_size:
        out.append(f"guest page size differs: source {src.guest.page_size}, destination "
                   f"{dst.guest.page_size}")
    return out


def _layout(src: GuestFacts, dst: GuestFacts) -> list[str]:
    a = sorted((r.gpa, r.size) for r in src.regions)
    b = sorted((r.gpa, r.size) for r in dst.regions)
    if a == b:
        return []
    only_a = [f"{g:#x}+{s:#x}" for g, s in a if (g, s) not in b]
    only_b = [f"{g:#x}+{s:#x}" for g, s in b if (g, s) not in a]
    return [f"guest memory layout differs: only on the source {only_a or '[]'}, only on the "
            f"destination {only_b or '[]'}"]


_NO_ID = ("no id is configured for it, so it pairs only with a device of the same name "
          "(PCI addresses differ between hosts): give it the same id in both hosts' "
          "configurations")


def _by_id(side: str, devices: tuple[DeviceInfo, ...], out: list[str]
           ) -> dict[str, DeviceInfo]:
    """``devices`` by id; an id listed twice is a refusal (the first one pairs)."""
    found: dict[str, DeviceInfo] = {}
    for d in devices:
        if d.id in found:
            out.append(f"the {side} lists device id {d.id} twice ({found[d.id].name} and "
                       f"{d.name}): ids must be unique within a guest")
        else:
            found[d.id] = d
    return found


def _unpaired(d: DeviceInfo, side: str, other: str) -> str:
    text = f"device {d.id} ({side} {d.name}) is not on the {other}"
    return text + (f": {_NO_ID}" if d.id == d.name else "")


def _devices(src: GuestFacts, dst: GuestFacts) -> list[str]:
    out: list[str] = []
    a_ids = _by_id("source", src.devices, out)
    b_ids = _by_id("destination", dst.devices, out)
    for i, a in a_ids.items():
        b = b_ids.get(i)
        if b is None:
            out.append(_unpaired(a, "source", "destination"))
            continue
        who = f"device {i} (source {a.name}, destination {b.name})"
        if a.identity != b.identity:
            keys = sorted(set(a.identity) | set(b.identity))
            diffs = [f"{k} {a.identity.get(k, '-')} vs {b.identity.get(k, '-')}" for k in keys
                     if a.identity.get(k) != b.identity.get(k)]
            out.append(f"{who}: identity differs: {', '.join(diffs)}")
        if a.protocol != b.protocol:
            out.append(f"{who}: migration protocol {a.protocol} vs {b.protocol}")
        if a.flags != b.flags:
            out.append(f"{who}: migration flags {a.flags:#x} vs {b.flags:#x}")
    out += [_unpaired(b, "destination", "source") for i, b in b_ids.items()
            if i not in a_ids]
    return out


def compare(source: MigrationFacts, dest: MigrationFacts) -> list[str]:
    """Every reason the guest cannot migrate from ``source`` to ``dest`` (empty = go)."""
    reasons: list[str] = []
    if source.protocol_version != dest.protocol_version:
        reasons.append(f"stream protocol differs: source speaks {source.protocol_version}, "
                       f"destination {dest.protocol_version}")
    reasons += _encryption(source, dest)
    reasons += _abi(source.host, dest.host)
    reasons += _memlock(source, dest)
    reasons += _pages(source, dest)
    reasons += _layout(source.guest, dest.guest)
    reasons += _devices(source.guest, dest.guest)
    return reasons


def check(source: MigrationFacts, dest: MigrationFacts) -> None:
    """Raise ``PreflightError`` listing every reason, or return if the migration may go."""
    reasons = compare(source, dest)
    if reasons:
        raise PreflightError(reasons)

