"""The daemon's configuration: ``/etc/vfiod/vfiod.toml`` validated into frozen dataclasses
(docs/architecture.md §6). A bad file is refused whole, naming the file, line and key
(``vfiod.toml:12: guest[0].ram[1].size: ...``); nothing is half-applied. The ``[sim]``
table (the simulated host of ``vfiod run --backend sim``) is read by ``config_sim``.
A device's ``id`` is the same on both hosts: a migration pairs devices by it, never by
order (docs/architecture.md §1.5). Ids are unique within a guest; without one, it is the
device's ``name`` (the addresses must then be equal, or preflight refuses, naming it).

    [control]
    socket = "/run/vfiod/control.sock"   # Unix socket for `vfiod ctl`
    group = "vfiod"                      # root and members of this group may use it

    [metrics]
    listen = "127.0.0.1:9477"            # Prometheus /metrics; "" turns it off

    [migration]
    listen = "0.0.0.0:4444"              # accept incoming migrations (absent: do not)
    downtime_limit_ms = 300              # default switchover limit
    timeout_s = 600                      # default: none
    on_timeout = "cancel"                # or "force"
    bandwidth_limit = "1GiB"             # bytes per second; default: unlimited
    ack_timeout_s = 60                   # wait at most this for each acknowledgement
    io_timeout_s = 120                   # a send or receive that moves nothing fails
    channels = 1                         # RAM channels (connections) per migration, 1-16
    [migration.tls]                      # optional: mutual TLS (both hosts, one CA)
    cert = "/etc/vfiod/host.pem"
    key = "/etc/vfiod/host.key"
    ca = "/etc/vfiod/ca.pem"
    allow = ["host-b.example"]           # peers' certificate names (CN or DNS SAN) that may
                                         # migrate with this host; absent: any the CA signed

    [paths]
    sysfs = "/sys"                       # roots of sysfs and devfs (tests use trees)
    dev = "/dev"
    state = "/var/lib/vfiod"             # the journal and the switchover history
                                         # (StateDirectory); made 0700 if missing

    [[guest]]
    name = "g1"
    memory = "4GiB"                      # one RAM region at guest address 0, or [[guest.ram]]
    # [[guest.ram]] tables: see config_ram.py (a shared file, or from = "vmm")
    start = "running"                    # "incoming": wait for a migration into it
    allow_peers = ["host-c.example"]     # with TLS: replaces [migration.tls] allow for it
    runstate = "qmp:/run/vm1.qmp"        # or "lines:PATH": pause/resume the VMM's vCPUs
    runstate_timeout_s = 5               # at switchover (docs/architecture.md §8.2)
    [guest.qemu]                         # migrate beside QEMU's own migration: see
    qmp = "/run/vm1.qmp"                 # config_qemu.py (docs/architecture.md §8.3)
    [[guest.device]]
    name = "0000:3b:00.1"                # this host's PCI address (or mdev UUID)
    id = "nic0"                          # the same on both hosts: migrations pair by it
    container = "default"                # devices of one container share its IOMMU space
    pre_copy_dirty_page_tracking = true  # false = QEMU's x-pre-copy-dirty-page-tracking=off
    # from = "vmm"                       # the VMM holds the device and hands its
                                         # container, group and device fds over with
                                         # `attach` (docs/architecture.md §8.1); needs the
                                         # guest's RAM from = "vmm" too, and every device
                                         # of its container from = "vmm"
    [[guest.container]]                  # optional: a container mapping only some regions
    name = "default"
    map = ["ram0"]

    # [[observe]] tables: see config_observe.py (another VMM's device: state only)
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass

import psutil

from vfiod.api.client import DEFAULT_SOCKET
from vfiod.api.ops import parse_host_port
from vfiod.daemon.config_devices import (
    ContainerConfig,
    DeviceConfig,
    parse_containers,
    parse_devices,
)
from vfiod.daemon.config_observe import ObserveConfig, check_observe, parse_observe
from vfiod.daemon.config_qemu import QemuConfig, parse_qemu
from vfiod.daemon.config_ram import RamConfig, parse_ram
from vfiod.daemon.config_sim import SimConfig, check_sim, parse_sim
from vfiod.daemon.config_toml import NAME, KeyLines, Table
from vfiod.errors import ConfigError
from vfiod.migration.stream.header import MAX_CHANNELS
from vfiod.migration.transport.tcp import TlsConfig

DEFAULT_PATH = "/etc/vfiod/vfiod.toml"
DEFAULT_METRICS = "127.0.0.1:9477"
DEFAULT_STATE_DIR = "/var/lib/vfiod"
#: a certificate name on an allow-list: printable, no space at either end
PEER_NAME = r"[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]{0,253}[^\s\x00-\x1f\x7f])?"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ControlConfig:
    socket: str = DEFAULT_SOCKET
    group: str = "vfiod"


@dataclass(frozen=True)
class MetricsConfig:
    listen: Address | None = Address("127.0.0.1", 9477)


@dataclass(frozen=True)
class MigrationConfig:
    listen: Address | None = None
    downtime_limit_ms: float = 300.0
    timeout_s: float | None = None
    on_timeout: str = "cancel"
    bandwidth_limit: int | None = None
    tls: TlsConfig | None = None
    ack_timeout_s: float = 60.0        # each acknowledgement of the peer
    io_timeout_s: float = 120.0        # a send or receive that makes no progress
    #: certificate names (CN or DNS SAN) a TLS peer must have one of; () = any the CA signed
    allow_peers: tuple[str, ...] = ()
    #: RAM channels an outgoing migration opens (docs/protocol.md §12); 1: none
    channels: int = 1


@dataclass(frozen=True)
class PathsConfig:
    sysfs: str = "/sys"
    dev: str = "/dev"
    state: str = DEFAULT_STATE_DIR     # the journal's directory


@dataclass(frozen=True)
class GuestConfig:
    name: str
    ram: tuple[RamConfig, ...]
    devices: tuple[DeviceConfig, ...] = ()
    page_size: int = 4096
    memory_encryption: str = "none"
    start: str = "running"
    #: containers that map only some RAM regions (default: every region)
    containers: tuple[ContainerConfig, ...] = ()
    #: TLS peers allowed for this guest, in place of [migration.tls] allow; None: that list
    allow_peers: tuple[str, ...] | None = None
    #: how vfiod pauses and resumes the VMM's vCPUs: "qmp:PATH" or "lines:PATH"
    #: (docs/architecture.md §8.2); None: only the guest's own run-state handlers
    runstate: str | None = None
    runstate_timeout_s: float = 5.0
    #: the QEMU whose own migration a migration of this guest is coordinated with (§8.3)
    qemu: QemuConfig | None = None

    def regions_of(self, container: str) -> tuple[RamConfig, ...]:
        c = next((c for c in self.containers if c.name == container), None)
        return self.ram if c is None else tuple(r for r in self.ram if r.name in c.map)

    @property
    def ram_bytes(self) -> int:
        return sum(r.size for r in self.ram)

    @property
    def vmm_ram(self) -> tuple[RamConfig, ...]:
        """The regions whose fds the VMM hands over: while any lacks one, the guest is
        not opened (it stays ``defined`` until ``attach``)."""
        return tuple(r for r in self.ram if r.from_vmm)

    @property
    def vmm_devices(self) -> tuple[DeviceConfig, ...]:
        """The devices whose VFIO fds the VMM hands over with ``attach``."""
        return tuple(d for d in self.devices if d.from_vmm)


@dataclass(frozen=True)
class Config:
    source: str = "(defaults)"
    control: ControlConfig = ControlConfig()
    metrics: MetricsConfig = MetricsConfig()
    migration: MigrationConfig = MigrationConfig()
    paths: PathsConfig = PathsConfig()
    guests: tuple[GuestConfig, ...] = ()
    sim: SimConfig = SimConfig()
    observe: tuple[ObserveConfig, ...] = ()

    def guest(self, name: str) -> GuestConfig | None:
        return next((g for g in self.guests if g.name == name), None)


def load_config(path: str) -> Config:
    """Read and validate ``path``; ``ConfigError`` naming file, line and key if it is bad."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse_config(text, path)


def host_memory_bytes() -> int:
    """This host's RAM: no guest configured here may have more."""
    return int(psutil.virtual_memory().total)


def parse_config(text: str, source: str = "(text)", *,
                 host_memory: int | None = None) -> Config:
    """``host_memory``: the RAM a guest may have at most (default: this host's)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message ends with "(at line N, column M)".
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    top = Table(data, (), KeyLines(text), source)
    cfg = Config(source=source, control=_control(top.table("control")),
                 metrics=_metrics(top.table("metrics")),
                 migration=_migration(top.table("migration")),
                 paths=_paths(top.table("paths")),
                 guests=tuple(_guest(t, host_memory or host_memory_bytes())
                              for t in top.tables("guest")),
                 sim=parse_sim(top.table("sim")),
                 observe=parse_observe(top.tables("observe")))
    top.finish()
    _cross_checks(cfg, top)
    return cfg


def _address(t: Table, key: str, default: str | None) -> Address | None:
    text = t.string(key, default)
    if not text:
        return None
    try:
        host, port = parse_host_port(text, what=key)
    except ValueError as e:
        raise t.error(key, str(e)) from None
    return Address(host, port)


def _control(t: Table) -> ControlConfig:
    sock = str(t.string("socket", DEFAULT_SOCKET))
    if not os.path.isabs(sock):
        raise t.error("socket", f"{sock!r} must be an absolute path")
    group = str(t.string("group", "vfiod", pattern=r"[a-z_][a-z0-9_-]{0,31}\$?",
                         hint="a Unix group name"))
    t.finish()
    return ControlConfig(sock, group)


def _metrics(t: Table) -> MetricsConfig:
    cfg = MetricsConfig(_address(t, "listen", DEFAULT_METRICS))
    t.finish()
    return cfg


def _migration(t: Table) -> MigrationConfig:
    listen = _address(t, "listen", None)
    limit = t.number("downtime_limit_ms", 300.0, high=3_600_000)
    timeout = t.number("timeout_s", None, high=7 * 86400)
    on_timeout = t.choice("on_timeout", ("cancel", "force"), "cancel")
    bw = t.size("bandwidth_limit", None, low=1)
    ack, io = (t.number(k, d, high=86400) for k, d in (("ack_timeout_s", 60.0),
                                                       ("io_timeout_s", 120.0)))
    channels = t.integer("channels", 1, low=1, high=MAX_CHANNELS)
    tls, allow = None, None
    if t.has("tls"):
        tt = t.table("tls")
        files = [str(tt.string(k, required=True, hint="a PEM file path")) for k in
                 ("cert", "key", "ca")]
        allow = _allow_list(tt, "allow")
        tt.finish()
        tls = TlsConfig(*files)
    t.finish()
    return MigrationConfig(listen, float(limit or 300.0), timeout, on_timeout, bw, tls,
                           float(ack or 60.0), float(io or 120.0), allow or (),
                           int(channels or 1))


def _allow_list(t: Table, key: str) -> tuple[str, ...] | None:
    """Certificate names, matched exactly (case aside); None when ``key`` is absent."""
    names = t.raw(key)
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise t.error(key, "must be an array of certificate names (CN or DNS SAN), e.g. "
                      '["host-b.example"]')
    if not names:
        raise t.error(key, "is empty, which would refuse every peer: list the peers' "
                      "certificate names, or leave it out to accept any the CA signed")
    for n in names:
        if not re.fullmatch(PEER_NAME, n):
            raise t.error(key, f"{n!r} is not a certificate name: 1 to 255 printable "
                          "characters, no space at either end")
        if "*" in n:
            raise t.error(key, f"{n!r}: wildcards are not matched; list each peer's name")
    return tuple(names)


def _paths(t: Table) -> PathsConfig:
    out = []
    for key, default in (("sysfs", "/sys"), ("dev", "/dev"), ("state", DEFAULT_STATE_DIR)):
        v = str(t.string(key, default))
        if not os.path.isabs(v):
            raise t.error(key, f"{v!r} must be an absolute path")
        out.append(v)
    t.finish()
    return PathsConfig(*out)


def _guest(t: Table, host_memory: int) -> GuestConfig:
    name = str(t.string("name", required=True, pattern=NAME,
                        hint="letters, digits and '_.+-', at most 64"))
    page = int(t.integer("page_size", 4096, low=4096) or 4096)
    if page & (page - 1):
        raise t.error("page_size", f"{page} is not a power of two")
    ram = parse_ram(t, name, page, host_memory)
    devices = parse_devices(t, name, ram)
    containers = parse_containers(t, name, ram, devices)
    enc = t.choice("memory_encryption", ("none", "sev", "sev-es", "sev-snp", "tdx"), "none")
    start = t.choice("start", ("running", "incoming"), "running")
    allow = _allow_list(t, "allow_peers")
    runstate = t.string("runstate", pattern=r"(qmp|lines):/.+",
                        hint='"qmp:/run/vm1.qmp" or "lines:/run/vm1.runstate" (an absolute '
                        "socket path)")
    timeout = float(t.number("runstate_timeout_s", 5.0, high=600) or 5.0)
    qemu = parse_qemu(t)
    if qemu is not None:
        if runstate is not None and runstate != f"qmp:{qemu.qmp}":
            raise t.error("runstate", f"{runstate!r} is not the QMP socket of [guest.qemu] "
                          f"({qemu.qmp}): vfiod pauses and resumes QEMU through that socket; "
                          "leave runstate out")
        runstate = f"qmp:{qemu.qmp}"
    t.finish()
    return GuestConfig(name, tuple(ram), tuple(devices), page, enc, start, tuple(containers),
                       allow, runstate, timeout, qemu)


def _cross_checks(cfg: Config, top: Table) -> None:
    guests = top.tables("guest")
    seen: dict[str, str] = {}
    for i, g in enumerate(cfg.guests):
        if any(h.name == g.name for h in cfg.guests[:i]):
            raise guests[i].error("name", f"guest name {g.name!r} is used twice")
        if g.allow_peers is not None and cfg.migration.tls is None:
            raise guests[i].error("allow_peers", "needs [migration.tls]: without TLS no "
                                  "peer has a certificate to check")
        devs = guests[i].tables("device")
        for j, d in enumerate(g.devices):
            if d.name in seen:
                raise devs[j].error("name", f"device {d.name} already belongs to guest "
                                    f"{seen[d.name]}")
            seen[d.name] = g.name
    check_sim(cfg.sim, top.table("sim"), {g.name for g in cfg.guests})
    check_observe(cfg.observe, top.tables("observe"), seen)
