"""Fixtures of the guest suite (runs inside the QEMU guest only; tests/kernel/conftest.py
keeps the host from collecting this folder).

Session-wide: two mtty-2 mdevs (a migration source and destination, docs/kernel-contract.md §9.1),
two instances of our own vfiod_dma device (native/vfiod_dma/README.md) and the edu device
bound to vfio-pci (§9.2). Per test: each opened through vfiod's own objects
(``Container`` → ``Group`` → ``Device`` over ``LinuxKernel``) and closed afterwards, so a
test that leaves a device mid-migration does not leak into the next one. Closing the
device fd is not enough for that on 6.12's mtty: its close_device ends the data sessions
but keeps the migration state (a device closed in STOP reopens in STOP, contrary to
docs/kernel-contract.md §6.3), so the mtty fixtures reset a device that is not RUNNING first.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.guest import native_dma, rig
from tests.kernel.guest import numba_cache as guest_numba
from vfiod.kernel.linux import LinuxKernel
from vfiod.migration.planning.hostfacts import HostFacts, gather_host_facts
from vfiod.migration.states import MigState
from vfiod.vfio import Container, Device, Group, HostPaths, discover_device

if os.environ.get("VFIOD_GUEST") != "1":  # pragma: no cover - a mistake, not a test path
    raise RuntimeError("tests/kernel/guest runs inside the QEMU guest only "
                       "(run tests/kernel/test_kernel_tier.py on the host)")


# numba reads its target and cache directory when it is first imported, which only the
# test modules do: set them now (numba_cache.py says why).
if guest_numba.guest_numba_ready() is None:
    if "numba" in sys.modules:  # pragma: no cover - an import-order mistake, say so loudly
        raise RuntimeError("numba was imported before tests/kernel/guest/conftest.py could "
                           "point it at the host-compiled cache")
    os.environ.update(guest_numba.guest_numba_env())

#: numba compilations that happened in the guest (the host's cache had no match)
_GUEST_COMPILES: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session")
def numba_cache() -> None:
    """Tests that run numba kernels (dirty tracker, stream checksums) need the cache the
    host compiled for the guest; every compilation that still happens here is listed in
    the guest's terminal summary, so a path the host's warm-up missed shows up."""
    missing = guest_numba.guest_numba_ready()
    if missing:
        pytest.fail(missing, pytrace=False)
    from numba.core import event

    class Recorder(event.Listener):
        def __init__(self) -> None:
            self.started: list[float] = []

        def on_start(self, ev: Any) -> None:
            self.started.append(time.monotonic())

        def on_end(self, ev: Any) -> None:
            took = time.monotonic() - self.started.pop()
            fn = ev.data["dispatcher"].py_func
            _GUEST_COMPILES.append(f"{fn.__module__}.{fn.__qualname__}{ev.data['args']}: "
                                   f"{took:.1f} s")

    event.register("numba:compile", Recorder())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _GUEST_COMPILES:
        terminalreporter.section("numba compiled in the guest (missing from the host's "
                                 "warm-up, numba_cache._exercise_numba_paths)")
        for line in _GUEST_COMPILES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def kernel() -> LinuxKernel:
    return LinuxKernel()


@pytest.fixture(scope="session")
def paths() -> HostPaths:
    return HostPaths()


@pytest.fixture(scope="module")
def host_facts(kernel: LinuxKernel) -> HostFacts:
    """This guest's facts, for the sessions' preflight (gathered once per test module)."""
    return gather_host_facts(kernel)


@pytest.fixture(scope="session")
def vfio_ready() -> None:
    """The VFIO core is there: modules loaded and the container node exists."""
    for mod in ("vfio", "vfio_iommu_type1"):
        rig.require_module(mod)
    rig.require_char_device(rig.DEV / "vfio" / "vfio",
                            "the VFIO container node (vfio.ko loaded?)")


@pytest.fixture(scope="session")
def mtty_pair(vfio_ready: None) -> Iterator[tuple[str, str]]:
    """UUIDs of two mtty-2 mdevs: source and destination."""
    rig.require_module("mdev")
    with rig.mtty_mdev("mtty-2") as src, rig.mtty_mdev("mtty-2") as dst:
        yield src, dst


@pytest.fixture(scope="session")
def mtty_uuid(mtty_pair: tuple[str, str]) -> str:
    return mtty_pair[0]


@pytest.fixture(scope="session")
def native_dma_pair(vfio_ready: None) -> Iterator[tuple[str, str]]:
    """UUIDs of two vfiod_dma mdevs (native/vfiod_dma/README.md): source and destination."""
    rig.require_module("mdev")
    with native_dma.native_dma_mdev() as src, native_dma.native_dma_mdev() as dst:
        yield src, dst


@pytest.fixture(scope="session")
def edu(vfio_ready: None) -> str:
    """The edu device's BDF, bound to vfio-pci."""
    bdf = rig.edu_bdf()
    rig.bind_vfio_pci(bdf)
    return bdf


@dataclass
class Opened:
    """One device opened the way vfiod opens it, with the objects that own it."""

    container: Container
    group: Group
    device: Device


def open_device(kernel: LinuxKernel, paths: HostPaths, name: str) -> Opened:
    """discover → container → group → SET_CONTAINER → SET_IOMMU(type1v2) → device fd."""
    found = discover_device(kernel, name, paths)
    if not found.vfio_capable or found.group is None:
        pytest.fail(f"{name} is not usable through VFIO: {found.reason}", pytrace=False)
    container = Container.open(kernel, paths)
    try:
        group = Group.open(kernel, paths, found.group)
        try:
            group.set_container(container)
        except BaseException:
            group.close()
            raise
        container.set_iommu()
        device = group.get_device(name)
    except BaseException:
        container.close()
        raise
    return Opened(container, group, device)


def close_migratable(o: Opened) -> None:
    """Close ``o``, first resetting its device to RUNNING if it is not (see the module
    docstring: mtty keeps its migration state across close)."""
    try:
        if not o.device.closed and o.device.get_mig_state() != MigState.RUNNING:
            o.device.reset()
    finally:
        o.container.close()


@pytest.fixture
def mtty(kernel: LinuxKernel, paths: HostPaths, mtty_uuid: str) -> Iterator[Opened]:
    o = open_device(kernel, paths, mtty_uuid)
    yield o
    close_migratable(o)


@pytest.fixture
def mtty_dst(kernel: LinuxKernel, paths: HostPaths,
             mtty_pair: tuple[str, str]) -> Iterator[Opened]:
    o = open_device(kernel, paths, mtty_pair[1])
    yield o
    close_migratable(o)


@pytest.fixture
def edu_dev(kernel: LinuxKernel, paths: HostPaths, edu: str) -> Iterator[Opened]:
    o = open_device(kernel, paths, edu)
    yield o
    o.container.close()
