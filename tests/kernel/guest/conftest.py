"""Fixtures of the guest suite (runs inside the QEMU guest only; tests/kernel/conftest.py
keeps the host from collecting this folder).

Session-wide: two mtty-2 mdevs (a migration source and destination, vfio-uapi.md §9.1) and
the edu device bound to vfio-pci (§9.2). Per test: each opened through vfiod's own objects
(``Container`` → ``Group`` → ``Device`` over ``LinuxKernel``) and closed afterwards, so a
test that leaves a device mid-migration does not leak into the next one (closing the
device fd returns it to RUNNING, vfio-uapi.md §6.3).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kernel.guest import rig
from vfiod.kernel.linux import LinuxKernel
from vfiod.vfio import Container, Device, Group, HostPaths, discover_device

if os.environ.get("VFIOD_GUEST") != "1":  # pragma: no cover - a mistake, not a test path
    raise RuntimeError("tests/kernel/guest runs inside the QEMU guest only "
                       "(run tests/kernel/test_kernel_tier.py on the host)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session")
def kernel() -> LinuxKernel:
    return LinuxKernel()


@pytest.fixture(scope="session")
def paths() -> HostPaths:
    return HostPaths()


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


@pytest.fixture
def mtty(kernel: LinuxKernel, paths: HostPaths, mtty_uuid: str) -> Iterator[Opened]:
    o = open_device(kernel, paths, mtty_uuid)
    yield o
    o.container.close()


@pytest.fixture
def mtty_dst(kernel: LinuxKernel, paths: HostPaths,
             mtty_pair: tuple[str, str]) -> Iterator[Opened]:
    o = open_device(kernel, paths, mtty_pair[1])
    yield o
    o.container.close()


@pytest.fixture
def edu_dev(kernel: LinuxKernel, paths: HostPaths, edu: str) -> Iterator[Opened]:
    o = open_device(kernel, paths, edu)
    yield o
    o.container.close()
