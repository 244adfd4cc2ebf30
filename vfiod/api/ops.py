"""The control protocol's operations and their typed arguments (docs/architecture.md §6).

Each operation has a frozen dataclass of arguments; ``parse_args(op, raw)`` checks the raw
JSON values of a ``Request`` and returns that dataclass, or raises ``ApiError`` naming the
operation, the argument and what was expected. The daemon and ``vfiod ctl`` share these,
so a request the client builds is exactly what the daemon validates.

=================  ===============================================================
op                 arguments
=================  ===============================================================
``hello``          none: the daemon's version, schema and backend
``status``         ``guest`` (optional): guests (each with its lifecycle ``state``, as
                   ``vfiod ctl --help`` lists them), their devices and migrations
``devices``        none: every VFIO device on the host, ours or not, and why; whether
                   it can migrate (``migratable``) and, if not, ``migratable_reason``
``check``          ``target``: a device or guest name: can it migrate, and why not
``migrate``        ``guest``, ``to`` ("HOST:PORT", "[v6]:PORT"), ``downtime_limit_ms``,
                   ``timeout_s``, ``on_timeout`` ("cancel" | "force"; needs timeout_s),
                   ``channels`` (1-16 RAM channels, docs/protocol.md §12)
``cancel``         ``guest``: cancel its running migration (source back to RUNNING)
``resolve``        ``guest``, ``resume_here`` (bool): settle an unsettled migration by hand
                   when its peer is gone for good (docs/architecture.md §1.7)
``dirty_tracking`` ``device``, ``enabled`` (bool): the per-device pre-copy dirty page
                   tracking flag (QEMU's x-pre-copy-dirty-page-tracking)
``attach``         ``guest``, ``ram``: a list of {``region``, ``gpa``, ``size``, ``offset``,
                   ``fd``}, ``fd`` indexing the fds sent with the request (SCM_RIGHTS):
                   a VMM hands a ``from = "vmm"`` guest's RAM over; ``vfio``
                   (optional): a list of {``container``, ``groups``: [{``group``,
                   ``fd``}], ``devices``: [{``name``, ``fd``}]} (``container`` and each
                   ``fd`` index the sent fds) for its ``from = "vmm"`` devices;
                   ``allow_reset`` (bool, default false): whether vfiod may reset them
                   (docs/architecture.md §8.1)
``detach``         ``guest``: give the VMM's RAM and VFIO fds back (vfiod closes its
                   copies)
=================  ===============================================================
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from vfiod.api.schema import ApiError, ApiErrorCode

#: RAM channels a migration may open: the stream's bound (``stream/header.py``
#: MAX_CHANNELS; this layer cannot import it, a test checks they agree)
MAX_MIGRATION_CHANNELS = 16

ON_TIMEOUT = ("cancel", "force")
#: Names of guests and devices: PCI BDFs, mdev UUIDs, operator-chosen guest names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$")


@dataclass(frozen=True)
class NoArgs:
    pass


@dataclass(frozen=True)
class StatusArgs:
    guest: str | None = None


@dataclass(frozen=True)
class CheckArgs:
    target: str


@dataclass(frozen=True)
class MigrateArgs:
    guest: str
    host: str
    port: int
    downtime_limit_ms: float | None = None
    timeout_s: float | None = None
    on_timeout: str | None = None
    channels: int | None = None

    @property
    def to(self) -> str:
        return format_host_port(self.host, self.port)


@dataclass(frozen=True)
class CancelArgs:
    guest: str


@dataclass(frozen=True)
class ResolveArgs:
    guest: str
    resume_here: bool


@dataclass(frozen=True)
class DirtyTrackingArgs:
    device: str
    enabled: bool


@dataclass(frozen=True)
class RamHandOver:
    """One RAM region an ``attach`` hands over: the region's name, guest address and size
    (as configured), where it starts in the file (``offset``), and which of the request's
    fds backs it (``fd``: its index in the order sent)."""

    region: str
    gpa: int
    size: int
    offset: int
    fd: int


@dataclass(frozen=True)
class VfioHandOver:
    """One type1 container a VMM hands over: the index of its fd, each group's number
    and fd index, each device's name and fd index (indexes into the request's fds)."""

    container: int
    groups: tuple[tuple[int, int], ...]          # (group number, fd index)
    devices: tuple[tuple[str, int], ...]         # (device name, fd index)

    def fd_indexes(self) -> tuple[int, ...]:
        return (self.container, *(i for _, i in self.groups), *(i for _, i in self.devices))


@dataclass(frozen=True)
class AttachArgs:
    guest: str
    ram: tuple[RamHandOver, ...]
    #: the fds that came with the request (SCM_RIGHTS), filled in by the control server:
    #: never read from JSON. The server closes them after the answer.
    fds: tuple[int, ...] = ()
    vfio: tuple[VfioHandOver, ...] = ()
    #: the VMM lets vfiod reset its devices (the recovery ladder's last rung)
    allow_reset: bool = False


@dataclass(frozen=True)
class DetachArgs:
    guest: str


Args = (NoArgs | StatusArgs | CheckArgs | MigrateArgs | CancelArgs | DirtyTrackingArgs
        | ResolveArgs | AttachArgs | DetachArgs)

OPS: tuple[str, ...] = ("hello", "status", "devices", "check", "migrate", "cancel",
                        "dirty_tracking", "resolve", "attach", "detach")
#: Operations that take fds (SCM_RIGHTS); the most one request may carry.
FD_OPS = ("attach",)
MAX_FDS = 64
_HAND_OVER_KEYS = ("region", "gpa", "size", "offset", "fd")


def parse_host_port(text: str, *, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → (host, port); ``ValueError`` saying what is wrong."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"{what} must be HOST:PORT, e.g. 10.0.0.2:4444")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{what} {text!r}: an IPv6 address is written [ADDR]:PORT")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what} {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{what} {text!r} must be HOST:PORT, e.g. 10.0.0.2:4444")
        if ":" in host:
            raise ValueError(f"{what} {text!r}: write an IPv6 address as [ADDR]:PORT")
        if not _HOSTNAME.match(host):
            raise ValueError(f"{what} {text!r}: {host!r} is not a host name or address")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{what} {text!r}: port {port_text!r} must be a number 0..65535")
    return host, int(port_text)


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Fields:
    """Reads one operation's raw arguments, each check naming the op and the argument."""

    def __init__(self, op: str, raw: dict[str, Any], known: tuple[str, ...]) -> None:
        self.op = op
        self.raw = raw
        unknown = sorted(set(raw) - set(known))
        if unknown:
            allowed = ", ".join(known) if known else "none"
            self.fail(f"unknown argument(s) {unknown} (allowed: {allowed})")

    def fail(self, message: str) -> None:
        raise ApiError(ApiErrorCode.BAD_REQUEST, f"{self.op}: {message}")

    def name(self, key: str, *, required: bool = True) -> str | None:
        v = self.raw.get(key)
        if v is None:
            if required:
                self.fail(f"argument {key!r} is required")
            return None
        if not isinstance(v, str) or not _NAME.match(v):
            self.fail(f"argument {key!r} must be a guest or device name (letters, digits, "
                      f"'_.:+-', at most 128), not {v!r}")
        return str(v)

    def number(self, key: str, *, low: float, high: float) -> float | None:
        v = self.raw.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float) or not low < v <= high:
            self.fail(f"argument {key!r} must be a number in ({low:g}, {high:g}], not {v!r}")
        return float(v)

    def flag(self, key: str) -> bool:
        v = self.raw.get(key)
        if not isinstance(v, bool):
            self.fail(f"argument {key!r} must be true or false, not {v!r}")
        return bool(v)


def parse_args(op: str, raw: dict[str, Any]) -> Args:
    """Validate ``raw`` (a request's ``args``) for ``op``; ``ApiError`` if anything is off."""
    if op not in OPS:
        raise ApiError(ApiErrorCode.UNKNOWN_OP,
                       f"unknown operation {op!r}; known: {', '.join(OPS)}")
    if op in ("hello", "devices"):
        _Fields(op, raw, ())
        return NoArgs()
    if op == "status":
        return StatusArgs(_Fields(op, raw, ("guest",)).name("guest", required=False))
    if op == "check":
        return CheckArgs(str(_Fields(op, raw, ("target",)).name("target")))
    if op == "cancel":
        return CancelArgs(str(_Fields(op, raw, ("guest",)).name("guest")))
    if op == "resolve":
        f = _Fields(op, raw, ("guest", "resume_here"))
        return ResolveArgs(str(f.name("guest")), f.flag("resume_here"))
    if op == "dirty_tracking":
        f = _Fields(op, raw, ("device", "enabled"))
        return DirtyTrackingArgs(str(f.name("device")), f.flag("enabled"))
    if op == "detach":
        return DetachArgs(str(_Fields(op, raw, ("guest",)).name("guest")))
    if op == "attach":
        return _attach(raw)
    return _migrate(raw)


def _attach(raw: dict[str, Any]) -> AttachArgs:
    f = _Fields("attach", raw, ("guest", "ram", "vfio", "allow_reset"))
    guest = str(f.name("guest"))
    ram = raw.get("ram")
    if not isinstance(ram, list) or not 1 <= len(ram) <= MAX_FDS:
        f.fail(f"argument 'ram' must be a list of 1..{MAX_FDS} regions "
               f"({{{', '.join(_HAND_OVER_KEYS)}}}), not {str(ram)[:100]}")
    out: list[RamHandOver] = []
    for i, item in enumerate(ram):  # type: ignore[arg-type]
        where = f"ram[{i}]"
        if not isinstance(item, dict) or sorted(item) != sorted(_HAND_OVER_KEYS):
            f.fail(f"{where} must have exactly the keys {list(_HAND_OVER_KEYS)}, "
                   f"not {str(item)[:100]}")
        region = item["region"]
        if not isinstance(region, str) or not _NAME.match(region):
            f.fail(f"{where}.region must be a RAM region name, not {region!r}")
        for key in ("gpa", "size", "offset", "fd"):
            v = item[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= 1 << 63:
                f.fail(f"{where}.{key} must be a non-negative integer, not {v!r}")
        if item["fd"] >= MAX_FDS:
            f.fail(f"{where}.fd {item['fd']} is not the index of a sent fd "
                   f"(at most {MAX_FDS} are sent)")
        if any(r.region == region for r in out):
            f.fail(f"{where}: region {region!r} is handed over twice")
        out.append(RamHandOver(region, item["gpa"], item["size"], item["offset"], item["fd"]))
    vfio = raw.get("vfio", [])
    if not isinstance(vfio, list) or len(vfio) > MAX_FDS:
        f.fail(f"argument 'vfio' must be a list of containers ({{container, groups, "
               f"devices}}), not {str(vfio)[:100]}")
    reset = raw.get("allow_reset", False)
    if not isinstance(reset, bool):
        f.fail(f"argument 'allow_reset' must be true or false, not {reset!r}")
    return AttachArgs(guest, tuple(out), (), tuple(_vfio(f, i, c) for i, c in enumerate(vfio)),
                      reset)


def _fd_index(f: _Fields, where: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < MAX_FDS:
        f.fail(f"{where} must be the index of a sent fd (0..{MAX_FDS - 1}), not {v!r}")
    return v  # type: ignore[return-value]


def _vfio(f: _Fields, i: int, item: object) -> VfioHandOver:
    where = f"vfio[{i}]"
    if not isinstance(item, dict) or sorted(item) != ["container", "devices", "groups"]:
        f.fail(f"{where} must have exactly the keys ['container', 'groups', 'devices'], "
               f"not {str(item)[:100]}")
    groups, devices = item["groups"], item["devices"]       # type: ignore[index]
    if not isinstance(groups, list) or not groups or not isinstance(devices, list) \
            or not devices:
        f.fail(f"{where}: groups and devices must be non-empty lists")
    gs: list[tuple[int, int]] = []
    for j, g in enumerate(groups):
        if not isinstance(g, dict) or sorted(g) != ["fd", "group"]:
            f.fail(f"{where}.groups[{j}] must be {{group, fd}}, not {str(g)[:100]}")
        number = g["group"]
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 1 << 31:
            f.fail(f"{where}.groups[{j}].group must be an IOMMU group number, not {number!r}")
        gs.append((number, _fd_index(f, f"{where}.groups[{j}].fd", g["fd"])))
    ds: list[tuple[str, int]] = []
    for j, d in enumerate(devices):
        if not isinstance(d, dict) or sorted(d) != ["fd", "name"]:
            f.fail(f"{where}.devices[{j}] must be {{name, fd}}, not {str(d)[:100]}")
        name = d["name"]
        if not isinstance(name, str) or not _NAME.match(name):
            f.fail(f"{where}.devices[{j}].name must be a device name, not {name!r}")
        ds.append((name, _fd_index(f, f"{where}.devices[{j}].fd", d["fd"])))
    return VfioHandOver(_fd_index(f, f"{where}.container", item["container"]),  # type: ignore[index]
                        tuple(gs), tuple(ds))


def _migrate(raw: dict[str, Any]) -> MigrateArgs:
    f = _Fields("migrate", raw, ("guest", "to", "downtime_limit_ms", "timeout_s",
                                 "on_timeout", "channels"))
    guest = str(f.name("guest"))
    to = raw.get("to")
    if to is None:
        f.fail("argument 'to' (HOST:PORT of the destination vfiod) is required")
    try:
        host, port = parse_host_port(to, what="destination")  # type: ignore[arg-type]
    except ValueError as e:
        f.fail(str(e))
    if port == 0:
        f.fail(f"destination {to!r}: port 0 is not a destination port")
    limit = f.number("downtime_limit_ms", low=0, high=3_600_000)
    timeout = f.number("timeout_s", low=0, high=7 * 86400)
    on_timeout = raw.get("on_timeout")
    if on_timeout is not None:
        if on_timeout not in ON_TIMEOUT:
            f.fail(f"argument 'on_timeout' must be one of {list(ON_TIMEOUT)}, "
                   f"not {on_timeout!r}")
        if timeout is None:
            f.fail("argument 'on_timeout' needs 'timeout_s' (what happens when it expires)")
    channels = raw.get("channels")
    if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int)
                                 or not 1 <= channels <= MAX_MIGRATION_CHANNELS):
        f.fail(f"argument 'channels' must be an integer from 1 to {MAX_MIGRATION_CHANNELS}, "
               f"not {channels!r}")
    return MigrateArgs(guest, host, port, limit, timeout, on_timeout, channels)


def args_to_json(args: Args) -> dict[str, Any]:
    """The raw ``args`` object for ``args`` (the client side of ``parse_args``)."""
    if isinstance(args, MigrateArgs):
        out: dict[str, Any] = {"guest": args.guest, "to": args.to}
        for key in ("downtime_limit_ms", "timeout_s", "on_timeout", "channels"):
            if getattr(args, key) is not None:
                out[key] = getattr(args, key)
        return out
    if isinstance(args, AttachArgs):       # the fds travel beside the line, not in it
        out = {"guest": args.guest, "ram": [vars(r) for r in args.ram]}
        if args.vfio:
            out["vfio"] = [{"container": c.container,
                            "groups": [{"group": g, "fd": i} for g, i in c.groups],
                            "devices": [{"name": n, "fd": i} for n, i in c.devices]}
                           for c in args.vfio]
        if args.allow_reset:
            out["allow_reset"] = True
        return out
    return {k: v for k, v in vars(args).items() if v is not None}
