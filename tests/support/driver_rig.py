"""The rig of the driver tests (tests/sim/test_driver_*.py, test_guest_claim.py): a
simulated host per side with one device opened through the real vfio/ objects (joined the
way a guest joins its groups), a full migration run through the hooks, and the fault
injectors' helpers (hook tracing with ``Traced`` from hooks.py, the v2 path-finding spy).

``Side`` = one host (SimHost), its container/group/device and the device's simulated model;
``migrate(src, dst)`` drives the seed's hook sequence exactly as a session would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.hooks import Traced
from vfiod.kernel.sim import SimHost
from vfiod.kernel.sim.interfaces import DeviceSpec
from vfiod.kernel.sim.migration import capability_specs
from vfiod.migration.device.probe import probe
from vfiod.migration.device.protocol import MigrationDriver
from vfiod.migration.guest.devices import join_group
from vfiod.migration.states import MigState
from vfiod.vfio import Container, Device, Group, HostPaths

#: The capability sets every behaviour is proven on (docs/kernel-contract.md §5, §6.2).
CAPS = ["v1", "v2_stop_copy", "v2_p2p", "v2_precopy", "v2_precopy_p2p"]
#: Small device state so each migration is quick; pre-copy offers more than one chunk.
SMALL = {"state_size": 12 * 1024, "precopy_size": 20 * 1024, "dirty_rate": 700}


def spec_for(cap: str, **overrides: object) -> DeviceSpec:
    return capability_specs(**{**SMALL, **overrides})[cap]


@dataclass
class Side:
    host: SimHost
    container: Container
    group: Group
    device: Device
    drivers: list[MigrationDriver] = field(default_factory=list)

    @classmethod
    def build(cls, root: Path, spec: DeviceSpec) -> Side:
        root.mkdir(parents=True, exist_ok=True)
        host = SimHost.build(root, [[spec]])
        paths = HostPaths(host.sysfs_root, host.dev_root)
        container = Container.open(host.kernel, paths)
        group = join_group(host.kernel, paths, container, host.group_of(spec.name))
        return cls(host, container, group, group.get_device(spec.name))

    @property
    def name(self) -> str:
        return self.device.name

    @property
    def model(self):  # noqa: ANN201 (the simulator's DeviceModel)
        return self.host.device(self.name).parts.model

    @property
    def faults(self):  # noqa: ANN201
        return self.host.kernel.faults

    def driver(self) -> MigrationDriver:
        d = probe(self.device)
        self.drivers.append(d)
        return d

    def kernel_state(self) -> MigState:
        """The device state as the simulated kernel holds it (not the driver's belief)."""
        node = self.host.device(self.name)
        for part in node.parts.features:
            if hasattr(part, "arcs"):
                return MigState(part.state)   # type: ignore[attr-defined]
        from vfiod.migration.device import v1_codec
        region = node.parts.regions[0]
        return v1_codec.state_of(region.device_state)   # type: ignore[attr-defined]

    def data_fds(self) -> list[int]:
        """Open migration data fds (must be none once a driver is done)."""
        return [fd for fd, f in self.host.kernel.open_files().items() if f.kind == "mig_data"]

    def transitions(self) -> list[str]:
        """State changes the kernel was asked for, in order (v2 arcs, v1 state writes)."""
        out = []
        for entry in self.faults.log:
            point = entry.split("@", 1)[0]
            if point.startswith("transition:") or (
                    point.startswith("v1:") and point not in ("v1:read_data", "v1:write_data")):
                out.append(point)
        return out

    def resets(self) -> int:
        return sum(1 for e in self.faults.log if e.startswith("ioctl:VFIO_DEVICE_RESET"))

    def close(self) -> None:
        self.device.close()
        self.group.close()
        self.container.close()
        self.host.close()


def pair(tmp_path: Path, cap: str, **overrides: object) -> tuple[Side, Side]:
    """A source device on host A and a same-kind destination device on host B."""
    spec = spec_for(cap, **overrides)
    src = Side.build(tmp_path / "A", spec)
    dst = Side.build(tmp_path / "B", dataclasses.replace(spec, name=spec.name, seed=99))
    return src, dst


Chunks = list[bytes]


def collect(chunks: Chunks) -> Callable[[bytes | memoryview], None]:
    return lambda c: chunks.append(bytes(c))


def save(src: Side, drv: MigrationDriver, *, ticks: int = 3, rounds: int = 12,
         max_bytes: int = 8 * 1024, hooks: list[str] | None = None) -> tuple[bytes, Chunks]:
    """The source half of a migration; the device runs (ticks) between iterations."""
    d: Any = Traced(drv, hooks) if hooks is not None else drv
    chunks: Chunks = []
    sink = collect(chunks)
    d.save_setup()
    for _ in range(rounds):
        src.model.tick(ticks)
        pending = d.save_live_pending()
        d.save_live_iterate(sink, max_bytes)
        if pending.precopy_bytes == 0:
            break
    record = d.save_state()
    if d.has_p2p:
        d.quiesce_p2p()
    d.save_live_complete_precopy(sink)
    return record, chunks


def load(drv: MigrationDriver, record: bytes, chunks: Chunks,
         hooks: list[str] | None = None) -> None:
    d: Any = Traced(drv, hooks) if hooks is not None else drv
    d.check_state(record)
    d.load_setup()
    for c in chunks:
        d.load_state(c)
    d.load_complete()
    d.resume()


def migrate(src: Side, dst: Side, **kw: object) -> tuple[MigrationDriver, MigrationDriver]:
    s, d = src.driver(), dst.driver()
    record, chunks = save(src, s, **kw)  # type: ignore[arg-type]
    load(d, record, chunks)
    s.cleanup()
    d.cleanup()
    return s, d


class PathRecorder:
    """Every (current, target) pair the simulated v2 kernel is asked to path-find."""

    def __init__(self) -> None:
        self.requests: list[tuple[MigState, MigState]] = []

    def forbidden(self) -> list[tuple[MigState, MigState]]:
        return [(c, t) for c, t in self.requests
                if c is MigState.STOP_COPY and t in (MigState.PRE_COPY, MigState.PRE_COPY_P2P)]


def record_paths(monkeypatch) -> PathRecorder:  # noqa: ANN001 (pytest.MonkeyPatch)
    """Wrap the simulator's next-state function to see every request reach the kernel."""
    import vfiod.kernel.sim.migration.v2 as sim_v2

    rec = PathRecorder()
    real = sim_v2.next_hop

    def spy(flags: int, cur: MigState, target: MigState, device: str = "") -> MigState:
        rec.requests.append((MigState(cur), MigState(target)))
        return real(flags, cur, target, device)
    monkeypatch.setattr(sim_v2, "next_hop", spy)
    return rec
