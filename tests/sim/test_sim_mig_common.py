"""Tests of the simulated kernel's migration rig (tests/support/sim_mig_rig.py) and of
``capability_specs`` / ``build_parts`` (docs/kernel-contract.md §5 - §7)."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

import vfiod.abi.vfio as v
from tests.support.sim_mig_rig import RigFactory, make_rigs, migrate, specs, twin
from vfiod.errors import KernelError
from vfiod.kernel.sim.migration import DeviceModel, build_parts, capability_specs


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[RigFactory]:
    yield from make_rigs(tmp_path)


# -- tests of capability_specs / build_parts --------------------------------------------------

def test_capability_specs_cover_every_set() -> None:
    s = capability_specs()
    base = {"v1": 0, "v2_stop_copy": v.VFIO_MIGRATION_STOP_COPY,
            "v2_p2p": v.VFIO_MIGRATION_STOP_COPY | v.VFIO_MIGRATION_P2P,
            "v2_precopy": v.VFIO_MIGRATION_STOP_COPY | v.VFIO_MIGRATION_PRE_COPY,
            "v2_precopy_p2p": v.VFIO_MIGRATION_STOP_COPY | v.VFIO_MIGRATION_P2P
            | v.VFIO_MIGRATION_PRE_COPY}
    assert set(s) == set(base) | {f"{b}_log" for b in base} | {"not_migratable"}
    for name, flags in base.items():
        assert s[name].mig_flags == flags and not s[name].dma_logging
        assert s[f"{name}_log"].mig_flags == flags and s[f"{name}_log"].dma_logging
    assert s["v1"].migration == "v1" and s["not_migratable"].migration == "none"
    assert len({x.name for x in s.values()}) == len(s)          # every spec its own BDF


def test_capability_specs_overrides_and_bad_override() -> None:
    assert all(x.state_size == 8192 for x in capability_specs(state_size=8192).values())
    with pytest.raises(TypeError, match="colour"):
        capability_specs(colour=1)
    with pytest.raises(TypeError, match="name"):
        capability_specs(name="x")


class _Fds:
    def __init__(self) -> None:
        from vfiod.kernel.sim.base import FaultInjector
        self.faults = FaultInjector()

    def install(self, file: object) -> int:
        raise AssertionError("not expected")


@pytest.mark.parametrize("name,parts", [
    ("v1", (0, 1, 0)), ("v1_log", (1, 1, 1)), ("v2_p2p", (1, 0, 0)),
    ("v2_p2p_log", (2, 0, 1)), ("not_migratable", (0, 0, 0)),
])
def test_build_parts_shapes(name: str, parts: tuple[int, int, int]) -> None:
    p = build_parts(capability_specs()[name], _Fds())
    assert (len(p.features), len(p.regions), len(p.dma_listeners)) == parts
    assert isinstance(p.model, DeviceModel)


@pytest.mark.parametrize("change,match", [
    ({"migration": "v3"}, "migration must be"),
    ({"mig_flags": v.VFIO_MIGRATION_P2P}, "must include VFIO_MIGRATION_STOP_COPY"),
    ({"mig_flags": v.VFIO_MIGRATION_STOP_COPY | 1 << 9}, "only STOP_COPY"),
    ({"extra": {"precopy_empty": "eof"}}, "precopy_empty"),
    ({"state_size": 0}, "state_size"),
    ({"dirty_rate": -1}, "dirty_rate"),
    ({"extra": {"error_set_errno": "EIO"}}, r"extra\['error_set_errno'\] must be an int"),
])
def test_build_parts_rejects_bad_specs(change: dict[str, object], match: str) -> None:
    spec = dataclasses.replace(capability_specs()["v2_precopy"], **change)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        build_parts(spec, _Fds())


@pytest.mark.parametrize("extra,match", [
    ({"v1_window": 1000}, "v1_window"), ({"v1_reserved": 0x3}, "v1_reserved"),
    ({"v1_region_index": 3}, "index must be >= 9"),
])
def test_build_parts_rejects_bad_v1_specs(extra: dict[str, object], match: str) -> None:
    spec = dataclasses.replace(capability_specs()["v1"], extra=extra)
    with pytest.raises(ValueError, match=match):
        build_parts(spec, _Fds())


def test_rig_migrates_and_not_migratable_answers_enotty(rig: RigFactory) -> None:
    s = specs()
    r = rig(s["v2_precopy_p2p"], twin(s["v2_precopy_p2p"]), s["not_migratable"])
    src, dst = r[s["v2_precopy_p2p"].name], r["0000:99:00.0"]
    assert src.model != dst.model
    migrate(src, dst, precopy=True)
    assert src.model == dst.model
    with pytest.raises(KernelError) as e:
        r[s["not_migratable"].name].mig_flags()
    assert e.value.errno == errno.ENOTTY
