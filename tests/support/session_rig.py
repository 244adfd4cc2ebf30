"""The rig the session scenario tests share (tests/sim/test_session_*.py, the prediction
benchmark; checked by tests/sim/test_session_rig.py).

``Side`` = one simulated host (``SimHost``) with a ``Guest`` on it, assembled by
``build_guest`` (the daemon's and the demo's builder) from ``SideContainer``s: each the
simulated devices of one container (one IOMMU group each) with its options. ``migrate(src, dst)`` runs a source and a
destination session over real loopback TCP (the destination in a thread), optionally
through a bandwidth cap and with a simulated workload writing the source guest's RAM by
device DMA. Checks used by every scenario:

* ``src.ram_digest()`` / ``dst.ram_digest()``: a full digest of guest RAM (pread, so holes
  stay holes) -- "guest memory untouched" and "destination equals source";
* ``side.kernel_states()``: device states as the simulated kernel holds them;
* ``side.mig_fds()``: open migration data fds (none may outlive a session);
* ``side.models()``: the simulated devices' internal state digests; ``paired(src, dst,
  ...)`` keys the destination's by the source device each one pairs with (same id:
  ``SideContainer.ids``), which is how ``assert_migrated`` compares device states.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfiod.kernel.sim import SimHost
from vfiod.kernel.sim.interfaces import DeviceSpec
from vfiod.kernel.sim.migration import capability_specs
from vfiod.kernel.sim.workload import DmaTarget, Workload, WorkloadConfig, fill
from vfiod.migration.guest import ContainerPlan, DevicePlan, Guest, GuestPlan, build_guest
from vfiod.migration.planning.hostfacts import (
    AbiLevel,
    CpuFacts,
    HostFacts,
    MemlockFacts,
    SevFacts,
    flags_up_to,
)
from vfiod.migration.session.common import MigrationResult, SessionConfig
from vfiod.migration.session.dest import DestinationSession
from vfiod.migration.session.history import SwitchoverHistory
from vfiod.migration.session.link import ThrottledLink
from vfiod.migration.session.ram_files import full_ram_digest
from vfiod.migration.session.source import SourceSession
from vfiod.migration.session.switchover import UNJOURNALED, SwitchoverJournal
from vfiod.migration.states import GuestState, MigrationState, MigState
from vfiod.migration.transport import Listener, connect
from vfiod.vfio import HostPaths, RamRegion
from vfiod.vfio.discovery import is_vfio_pci_driver

MiB = 1 << 20
PAGE = 4096
#: small device state so scenarios stay quick; pre-copy offers more than one chunk
SMALL = {"state_size": 12 * 1024, "precopy_size": 20 * 1024, "dirty_rate": 700}


def spec(cap: str, name: str | None = None, **overrides: Any) -> DeviceSpec:
    """Capability set ``cap``, bound to a driver sysfs discovery counts as VFIO (as
    ``[sim]`` binds it, daemon/simhost.py: the v1 sets name a vendor driver that is not)."""
    s = capability_specs(**{**SMALL, **overrides})[cap]
    if not is_vfio_pci_driver(s.driver):
        s = dataclasses.replace(s, driver="vfio-pci")
    return dataclasses.replace(s, name=name) if name else s


def host_facts(name: str, abi: AbiLevel = AbiLevel.V3) -> HostFacts:
    flags = flags_up_to(abi)
    return HostFacts(name, CpuFacts("AuthenticAMD", "sim", flags, abi),
                     SevFacts(False, False, None, None),
                     MemlockFacts(None, None, 0, True), PAGE)


@dataclass
class SideContainer:
    """The simulated devices of one container of the guest (each in its own IOMMU group)
    and the container's options."""

    devices: Sequence[DeviceSpec]
    maps: Sequence[tuple[int, int]] | None = None      # (gpa, size); None = all RAM
    opt_out: Sequence[str] = ()                          # device names with the opt-out
    disable: Sequence[str] = ()
    #: the devices' ids, in ``devices`` order; empty: "dev<k>", k counting the guest's
    #: devices over all containers (``pair`` keeps the order, so its sides pair up)
    ids: Sequence[str] = ()


@dataclass
class Side:
    host: SimHost
    guest: Guest
    facts: HostFacts
    workload: Workload | None = None
    initial_models: dict[str, str] = field(default_factory=dict)
    initial_ram: list[Any] = field(default_factory=list)
    #: device name -> id (the guest forgets its devices when it releases them)
    ids: dict[str, str] = field(default_factory=dict)

    @property
    def kernel(self):  # noqa: ANN201
        return self.host.kernel

    def ram_digest(self) -> list[Any]:
        return [r.to_dict() for r in full_ram_digest(self.kernel, self.guest.ram)]

    def models(self) -> dict[str, str]:
        return {n: d.parts.model.digest() for n, d in self.host.devices.items()
                if d.parts.model is not None}

    def kernel_states(self) -> dict[str, MigState]:
        from vfiod.migration.device import v1_codec
        out = {}
        for n, node in self.host.devices.items():
            for part in node.parts.features:
                if hasattr(part, "arcs"):
                    out[n] = MigState(part.state)
            for region in node.parts.regions:
                if hasattr(region, "device_state"):
                    out[n] = v1_codec.state_of(region.device_state)
        return out

    def mig_fds(self) -> list[int]:
        return [fd for fd, f in self.kernel.open_files().items() if f.kind == "mig_data"]

    def open_kinds(self) -> list[str]:
        return sorted(f.kind for f in self.kernel.open_files().values())

    def close(self) -> None:
        if self.workload is not None:
            self.workload.stop()
        self.guest.close()
        self.host.close()


def guest_plan(plans: Sequence[SideContainer], ram: Sequence[RamRegion]) -> GuestPlan:
    """Guest ``vm1``: container ``c<i>`` holds the devices of ``plans[i]``."""
    devices: list[DevicePlan] = []
    containers = []
    for i, p in enumerate(plans):
        ids = list(p.ids) or [f"dev{len(devices) + j}" for j in range(len(p.devices))]
        devices += [DevicePlan(s.name, f"c{i}", s.name not in p.opt_out, dev_id)
                    for s, dev_id in zip(p.devices, ids, strict=True)]
        containers.append(ContainerPlan(f"c{i}", None if p.maps is None else tuple(p.maps),
                                        tuple(p.disable)))
    return GuestPlan("vm1", tuple(ram), tuple(devices), tuple(containers))


def build_side(root: Path, name: str, plans: Sequence[SideContainer], *,
               ram: Sequence[RamRegion] = (RamRegion("ram", 0, 8 * MiB),),
               fill_bytes: int = 0, seed: int = 1, abi: AbiLevel = AbiLevel.V3) -> Side:
    root.mkdir(parents=True, exist_ok=True)
    host = SimHost.build(root, [[s] for p in plans for s in p.devices])
    try:
        guest = build_guest(host.kernel, guest_plan(plans, ram),
                            HostPaths(host.sysfs_root, host.dev_root))
    except BaseException:
        host.close()
        raise
    try:
        if fill_bytes:
            fill(guest.ram[0].view(), fill_bytes, seed=seed, extent=256 * 1024)
    except BaseException:
        guest.close()
        host.close()
        raise
    side = Side(host, guest, host_facts(name, abi), ids={d.name: d.id for d in guest.devices})
    side.initial_models = side.models()
    side.initial_ram = side.ram_digest()
    return side


def pair(tmp: Path, plans: Sequence[SideContainer], **kw: Any) -> tuple[Side, Side]:
    """Source and destination with same-kind devices (other names and seeds)."""
    src = build_side(tmp / "src", "hostA", plans, **kw)
    return src, dest_side(tmp, plans, **kw)


def dest_side(tmp: Path, plans: Sequence[SideContainer], **kw: Any) -> Side:
    """``pair``'s destination alone (its RAM starts empty)."""
    dplans = [SideContainer([dataclasses.replace(s, name=_dest_name(s.name), seed=s.seed + 50)
                             for s in p.devices],
                            p.maps, [_dest_name(n) for n in p.opt_out], p.disable, p.ids)
              for p in plans]
    kw = {k: v for k, v in kw.items() if k not in ("fill_bytes", "seed")}
    return build_side(tmp / "dst", "hostB", dplans, **kw)


def _dest_name(name: str) -> str:
    if name.startswith("0000:"):            # another bus on the destination host
        return "0000:8" + name[6:]
    return name[:-4] + "beef"


def add_workload(side: Side, targets: Sequence[DmaTarget], **cfg: Any) -> Workload:
    wl = Workload(side.host, targets, WorkloadConfig(**cfg))
    side.workload = wl
    side.guest.add_run_state_handler(wl.on_run_state)
    return wl


def replay_digest(root: Path, plans: Sequence[SideContainer], workload: Workload,
                  **kw: Any) -> list[Any]:
    """The RAM digest the source guest must have if nothing but its workload wrote it:
    a fresh side built the same way, with the same writes replayed (the workload is
    deterministic from its seed)."""
    side = build_side(root, "replay", plans, **kw)
    try:
        Workload(side.host, workload.targets, workload.config).run_writes(workload.writes)
        return side.ram_digest()
    finally:
        side.close()


@dataclass
class Run:
    source: MigrationResult
    dest: MigrationResult | None
    dest_error: BaseException | None = None
    session: SourceSession | None = None
    dest_session: DestinationSession | None = None
    #: the source's device model digests by device name when the migration completed
    #: (before release)
    src_models_at_end: dict[str, str] = field(default_factory=dict)


def migrate(src: Side, dst: Side, config: SessionConfig | None = None, *,
            dest_config: SessionConfig | None = None, rate_bps: float | None = None,
            src_encryption: str = "none", dst_encryption: str = "none",
            on_source: Callable[[SourceSession], None] | None = None,
            on_dest: Callable[[DestinationSession], None] | None = None,
            progress: Callable[[Any], None] | None = None,
            wrap_dest: Callable[[Any], Any] | None = None,
            wrap_source: Callable[[Any], Any] | None = None,
            journals: tuple[SwitchoverJournal, SwitchoverJournal] = (UNJOURNALED,
                                                                     UNJOURNALED),
            timeout: float = 120.0, history: SwitchoverHistory | None = None,
            vmm: tuple[Any, Any] = (None, None)) -> Run:
    """One migration attempt over loopback TCP; the destination runs in a thread.
    ``wrap_dest``/``wrap_source`` wrap either end's link (faults); ``on_source``/
    ``on_dest`` see either session before it runs; ``journals``: the
    source's and the destination's switchover journal; ``history``: earlier switchovers
    the source learns from (None: none, so one test's migrations do not steer another's
    policy decisions); ``vmm``: the source's and the destination's VMM half of a
    coordinated migration (tests/support/fake_vmm.py)."""
    config = config or SessionConfig()
    box: dict[str, Any] = {}
    with Listener("127.0.0.1", 0) as lst:
        def dest() -> None:
            try:
                conn = lst.accept(timeout=timeout)
                with conn:
                    link = wrap_dest(conn) if wrap_dest is not None else conn
                    s = DestinationSession(dst.guest, link, host=dst.facts,
                                           config=dest_config or config,
                                           memory_encryption=dst_encryption,
                                           journal=journals[1], vmm=vmm[1])
                    box["session"] = s
                    if on_dest is not None:
                        on_dest(s)
                    box["result"] = s.run()
            except BaseException as e:  # noqa: BLE001 - reported to the test
                box["error"] = e

        t = threading.Thread(target=dest, name="dest-session")
        t.start()
        conn = connect("127.0.0.1", lst.address[1], timeout=timeout)
        link = ThrottledLink(conn, rate_bps) if rate_bps else conn
        if wrap_source is not None:
            link = wrap_source(link)
        models: dict[str, str] = {}

        def at_end(old: MigrationState, new: MigrationState) -> None:
            if new is MigrationState.COMPLETED:
                models.update(src.models())

        try:
            s = SourceSession(src.guest, link, host=src.facts, config=config,
                              memory_encryption=src_encryption, progress=progress,
                              journal=journals[0], vmm=vmm[0],
                              history=history if history is not None else SwitchoverHistory())
            s.add_state_handler(at_end)
            if on_source is not None:
                on_source(s)
            res = s.run()
        finally:
            conn.close()
        t.join(timeout)
        assert not t.is_alive(), "destination session did not finish"
    assert "error" not in box, f"destination thread raised {box.get('error')!r}"
    return Run(res, box.get("result"), box.get("error"), s, box.get("session"), models)


def dial(lst: Listener) -> Any:
    """A source's channel dialer that connects to ``lst``."""
    return lambda i, n: connect("127.0.0.1", lst.address[1], timeout=10)


def with_channels(lst: Listener, dialer: Any = None) -> dict[str, Any]:
    """``migrate`` keywords for RAM channels (docs/protocol.md §12): the source dials
    (``dialer``, else ``dial(lst)``), the destination accepts, on ``lst``."""
    def on_source(s: SourceSession) -> None:
        s.channel_dialer = dialer or dial(lst)

    def on_dest(d: DestinationSession) -> None:
        d.channel_acceptor = lambda timeout: lst.accept(timeout)
    return {"on_source": on_source, "on_dest": on_dest}


def paired(src: Side, dst: Side, dst_values: dict[str, Any]) -> dict[str, Any]:
    """``dst_values`` (by destination device name) keyed by the name of the source device
    each destination device pairs with (the one with the same id)."""
    dst_name = {dev_id: name for name, dev_id in dst.ids.items()}
    return {name: dst_values[dst_name[dev_id]] for name, dev_id in src.ids.items()
            if dst_name[dev_id] in dst_values}


def assert_migrated(src: Side, dst: Side, run: Run) -> None:
    """The destination verified every digest, its RAM and device states equal the
    source's, it runs; the source released everything (no fd left)."""
    r, d = run.source, run.dest
    assert d is not None
    assert r.result == "completed", (r.reason, r.failed_hook)
    assert d.result == "completed", d.reason
    assert r.verified is True and d.verified is True
    assert d.verification["manifest"]["verified"] is True
    assert d.verification["content_verified"] is True
    assert src.ram_digest() == dst.ram_digest()
    assert run.src_models_at_end == paired(src, dst, dst.models())
    assert set(dst.kernel_states().values()) == {MigState.RUNNING}
    assert dst.mig_fds() == [] and src.mig_fds() == []
    assert src.kernel.open_files() == {}                      # released: fds closed
    assert src.guest.run_state is GuestState.POSTMIGRATE
    assert dst.guest.run_state is GuestState.RUNNING
    assert r.actual_downtime_s is not None and r.actual_downtime_s > 0
    assert r.predicted_downtime_s is not None


def assert_rolled_back(src: Side, dst: Side, run: Run, ram_before: list[Any],
                       dst_ram_before: list[Any] | None = None) -> None:
    """Source devices RUNNING, guest running, tracking stopped, guest memory untouched,
    no migration fd left on either side; the destination discarded what it loaded."""
    r = run.source
    assert r.result in ("failed", "cancelled"), r
    assert set(src.kernel_states().values()) == {MigState.RUNNING}
    assert src.guest.run_state is GuestState.RUNNING
    assert src.ram_digest() == ram_before
    assert src.mig_fds() == [] and dst.mig_fds() == []
    n = len(src.guest.devices)
    assert sorted(src.open_kinds()) == sorted(["container"] * len(src.guest.containers)
                                              + ["group"] * n + ["device"] * n)
    s = run.session
    assert s is not None and (s.tracker is None or not s.tracker.running)
    if s.tracker is not None:
        assert not any(c.running for c in s.tracker.status().containers)
    d = run.dest
    assert d is not None and d.result in ("failed", "cancelled"), d
    assert set(dst.kernel_states().values()) == {MigState.RUNNING}
    assert dst.models() == dst.initial_models                 # nothing loaded survives
    assert dst.guest.run_state is not GuestState.RUNNING
    assert dst.ram_digest() == (dst_ram_before or dst.initial_ram)   # received RAM zeroed


@contextmanager
def side_pairs(tmp_path: Path, plans: Sequence[SideContainer], ram: Any
               ) -> Iterator[Callable[..., tuple[Side, Side]]]:
    """A maker of (source, destination) pairs on ``plans``/``ram`` (keywords go to
    ``pair``); every side it made is closed afterwards."""
    made: list[Side] = []

    def make(**kw: Any) -> tuple[Side, Side]:
        s, d = pair(tmp_path, plans, ram=ram, **kw)
        made.extend((s, d))
        return s, d
    try:
        yield make
    finally:
        for side in made:
            side.close()
