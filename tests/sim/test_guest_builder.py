"""``build_guest`` (vfiod/migration/guest/builder.py), the one assembly of a guest for the
daemon, the demo and the tests, and the migratability check it shares with the probe of a
device no guest owns (guest/migratability.py; docs/architecture.md §1 steps 2-4)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.session_rig import MiB, spec
from vfiod.errors import NotMigratable
from vfiod.kernel.sim import HostDevice, SimHost
from vfiod.migration.guest import (
    ContainerPlan,
    DevicePlan,
    GuestPlan,
    UnusableDevice,
    build_guest,
)
from vfiod.migration.guest.migratability import guest_migratability, probe_unowned_device
from vfiod.vfio import DmaMapping, HostPaths, RamRegion

PS = 4096
A, B, C = "0000:3b:00.1", "0000:3c:00.1", "0000:3d:00.1"
BROKEN, HOSTED, SIBLING = "0000:5f:00.0", "0000:61:00.0", "0000:61:00.1"
RAM = (RamRegion("low", 0, 8 * MiB), RamRegion("high", 16 * MiB, 4 * MiB))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[SimHost]:
    h = SimHost.build(tmp_path, {
        10: [spec("v2_precopy_log", A)], 11: [spec("v2_p2p_log", B)],
        12: [spec("v2_p2p_log", C)], 13: [spec("not_migratable", BROKEN)],
        14: [spec("v2_stop_copy", HOSTED), HostDevice(SIBLING, driver="ixgbe")]})
    yield h
    h.close()


def _paths(host: SimHost) -> HostPaths:
    return HostPaths(host.sysfs_root, host.dev_root)


def test_containers_follow_the_plan(host: SimHost) -> None:
    plan = GuestPlan("g", RAM, (DevicePlan(B, "dma"), DevicePlan(A, "main"),
                                DevicePlan(C, "dma", pre_copy_dirty_page_tracking=False)),
                     (ContainerPlan("dma", ((16 * MiB, 2 * MiB),), ("device-logging",)),))
    g = build_guest(host.kernel, plan, _paths(host))
    try:
        # containers in the order of their first device; an unlisted one maps all RAM
        assert [(c.name, c.devices) for c in g.containers] == [("dma", [B, C]), ("main", [A])]
        dma, main = g.containers
        def layout(ms: list[DmaMapping]) -> list[tuple[int, int, int]]:
            return [(m.iova, m.size, m.gpa) for m in ms]
        assert layout(dma.mappings) == [(16 * MiB, 2 * MiB, 16 * MiB)]
        assert dma.disable == ("device-logging",)
        assert layout(main.mappings) == [(0, 8 * MiB, 0), (16 * MiB, 4 * MiB, 16 * MiB)]
        # each mapping carries the process address the kernel pinned: inside guest RAM
        assert all(m.vaddr is not None for m in dma.mappings + main.mappings)
        assert {d.name: d.pre_copy_dirty_page_tracking for d in g.devices} == {
            B: True, C: False, A: True}
        assert g.ram_regions() == RAM
    finally:
        g.close()
    assert host.kernel.open_files() == {}


def test_a_ram_file_backs_its_region_and_is_closed_with_the_guest(host: SimHost,
                                                                   tmp_path: Path) -> None:
    path = tmp_path / "high.ram"
    path.write_bytes(b"\x5a" * PS + bytes(4 * MiB - PS))
    g = build_guest(host.kernel, GuestPlan("g", RAM, ram_files={"high": str(path)}),
                    _paths(host))
    fds = [b.fd for b in g.ram]
    try:
        low, high = g.ram
        assert bytes(high.view()[:2]) == b"\x5a\x5a" and not any(low.view()[:PS])
        high.view()[PS] = 7                         # MAP_SHARED: the file sees it
        assert path.read_bytes()[PS] == 7
    finally:
        g.close()
    for fd in fds:
        with pytest.raises(OSError) as e:
            os.fstat(fd)
        assert e.value.errno == errno.EBADF


def test_a_device_sysfs_does_not_offer_names_itself(host: SimHost) -> None:
    plan = GuestPlan("g", RAM, (DevicePlan(A, "c0"), DevicePlan(HOSTED, "c1")))
    with pytest.raises(UnusableDevice) as e:
        build_guest(host.kernel, plan, _paths(host))
    assert (e.value.device, e.value.errno) == (HOSTED, errno.ENODEV)
    assert "bound to host driver ixgbe" in e.value.reason
    assert host.kernel.open_files() == {}           # c0, opened first, was closed again


def test_a_device_without_migration_names_itself(host: SimHost) -> None:
    with pytest.raises(NotMigratable) as e:
        build_guest(host.kernel, GuestPlan("g", RAM, (DevicePlan(BROKEN),)), _paths(host))
    assert e.value.device == BROKEN
    assert host.kernel.open_files() == {}


def test_options_of_a_container_without_devices_are_refused(host: SimHost) -> None:
    plan = GuestPlan("g", RAM, (DevicePlan(A, "c0"),), (ContainerPlan("c9"),))
    with pytest.raises(ValueError, match=r"containers \['c9'\] have no device"):
        build_guest(host.kernel, plan, _paths(host))


def test_a_guest_device_and_an_unowned_one_get_the_same_answer(host: SimHost) -> None:
    g = build_guest(host.kernel, GuestPlan("g", RAM, (DevicePlan(B),)), _paths(host))
    try:
        owned = guest_migratability(g)[B]
        before = len(host.kernel.open_files())
        unowned = probe_unowned_device(host.kernel, _paths(host), C, host.group_of(C))
        assert len(host.kernel.open_files()) == before     # the probe closed what it opened
    finally:
        g.close()
    assert owned == unowned
    assert (owned.protocol, owned.capabilities, owned.dma_logging, owned.tracker) == (
        "v2", ("STOP_COPY", "P2P", "DMA_LOGGING"), True, "device-logging")
    assert owned.summary == "migration v2 (STOP_COPY, P2P, DMA_LOGGING)"
