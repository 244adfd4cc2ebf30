"""The rig of the vfio-layer simulator tests (tests/sim/test_vfio_*.py; checked by
tests/sim/test_vfio_rig.py): a simulated host with the topology the tests need, and device parts plugged in through the simulator's
documented contracts (``SimRegion``, ``FeatureHandler``, vfiod/kernel/sim/interfaces.py).

The parts are deliberately small: they exercise the vfio layer's argument packing, the
two-call pattern and errno surfacing. Migration behaviour proper is tested with the
simulator's own migration parts in the migration layer's tests.
"""

from __future__ import annotations

import ctypes
import errno
import mmap as _mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import vfiod.abi.vfio as v
from vfiod.kernel.sim import HostDevice, SimHost
from vfiod.kernel.sim.base import SimFile, fail
from vfiod.kernel.sim.interfaces import DeviceParts, DeviceSpec, FdTable
from vfiod.vfio import Container, Device, Group, HostPaths

PCI = "0000:3b:00.1"            # group 10: alone, ours
BLOCKED = "0000:5e:00.0"        # group 11: with a host-bound sibling → not viable
SIBLING = "0000:5e:00.1"
FOREIGN = "0000:3b:00.0"        # group 12: host driver only → no /dev/vfio/12
MDEV = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"   # group 13: emulated IOMMU (pinned scope)
PCI2 = "0000:3b:00.2"           # group 14: a second VFIO group for multi-group containers
GROUP = {PCI: 10, BLOCKED: 11, FOREIGN: 12, MDEV: 13, PCI2: 14}

VENDOR_REGION = 9
VENDOR_TYPE = v.VFIO_REGION_TYPE_PCI_VENDOR_TYPE | 0x15B3
VENDOR_SUBTYPE = 7
SPARSE = ((0x0, 0x1000), (0x2000, 0x1000))     # page 1 (0x1000) is not mmappable


class VendorRegion:
    """A device-specific region (index 9) with SPARSE_MMAP and TYPE capabilities."""

    index = VENDOR_REGION
    size = 0x3000
    flags = (v.VFIO_REGION_INFO_FLAG_READ | v.VFIO_REGION_INFO_FLAG_WRITE
             | v.VFIO_REGION_INFO_FLAG_MMAP)

    def __init__(self) -> None:
        self.data = bytearray(self.size)
        self.maps: list[_mmap.mmap] = []

    def caps(self) -> list[bytes]:
        sparse_t = v.vfio_region_info_cap_sparse_mmap
        head = sparse_t(header=v.vfio_info_cap_header(id=v.VFIO_REGION_INFO_CAP_SPARSE_MMAP,
                                                      version=1), nr_areas=len(SPARSE))
        areas = b"".join(bytes(v.vfio_region_sparse_mmap_area(offset=o, size=s))
                         for o, s in SPARSE)
        typ = v.vfio_region_info_cap_type(
            header=v.vfio_info_cap_header(id=v.VFIO_REGION_INFO_CAP_TYPE, version=1),
            type=VENDOR_TYPE, subtype=VENDOR_SUBTYPE)
        return [bytes(head) + areas, bytes(typ)]

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    def pwrite(self, data: bytes, offset: int) -> int:
        self.data[offset:offset + len(data)] = data
        return len(data)

    def mmap(self, length: int, offset: int, prot: int) -> object:
        m = _mmap.mmap(-1, length)            # test memory standing in for device memory
        m[:] = bytes(self.data[offset:offset + length])
        self.maps.append(m)
        return m


class DataFile(SimFile):
    """A saving data fd: a fixed stream and VFIO_MIG_GET_PRECOPY_INFO."""

    kind = "mig_data"
    ioctl_names = v.MIG_DATA_IOCTLS

    def __init__(self, name: str, payload: bytes) -> None:
        super().__init__(name)
        self.payload = payload
        self.pos = 0

    def read(self, length: int) -> bytes:
        chunk = self.payload[self.pos:self.pos + length]
        self.pos += len(chunk)
        return chunk

    def ioctl(self, request: int, arg: object, label: str) -> int:
        info = v.vfio_precopy_info.from_buffer(arg)  # type: ignore[arg-type]
        if info.argsz < 24:
            raise fail(errno.EINVAL, label, self.name, "argsz < 24")
        info.initial_bytes, info.dirty_bytes = len(self.payload) - self.pos, 3
        return 0


class MigFeatures:
    """MIGRATION, MIG_DEVICE_STATE and MIG_DATA_SIZE with a plain recorded state: enough
    to check how the vfio layer packs and unpacks them (no transition rules here)."""

    feature_ids: tuple[int, ...] = (v.VFIO_DEVICE_FEATURE_MIGRATION, v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                   v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE)

    def __init__(self, spec: DeviceSpec, fdt: FdTable) -> None:
        self.spec = spec
        self.fdt = fdt
        self.state = v.VFIO_DEVICE_STATE_RUNNING
        self.sets: list[int] = []

    def directions(self, feature: int) -> int:
        if feature == v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE:
            return v.VFIO_DEVICE_FEATURE_GET | v.VFIO_DEVICE_FEATURE_SET
        return v.VFIO_DEVICE_FEATURE_GET

    def handle(self, feature: int, flags: int, payload: memoryview) -> None:
        if feature == v.VFIO_DEVICE_FEATURE_MIGRATION:
            struct.pack_into("=Q", payload, 0, self.spec.mig_flags)
        elif feature == v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE:
            struct.pack_into("=Q", payload, 0, self.spec.state_size)
        elif flags & v.VFIO_DEVICE_FEATURE_GET:
            struct.pack_into("=Ii", payload, 0, self.state, -1)
        else:
            (want,) = struct.unpack_from("=I", payload, 0)
            self.sets.append(want)
            if want == v.VFIO_DEVICE_STATE_ERROR or want >= v.VFIO_DEVICE_STATE_NR:
                raise fail(errno.EINVAL, "MIG_DEVICE_STATE", self.spec.name, f"state {want}")
            fd = -1
            if want == v.VFIO_DEVICE_STATE_PRE_COPY:
                fd = self.fdt.install(DataFile(self.spec.name, b"precopy-bytes"))
            self.state = want
            struct.pack_into("=Ii", payload, 0, want, fd)


class LogFeatures:
    """DMA_LOGGING_START/STOP/REPORT: records the START control and its ranges, answers a
    chosen granule, and REPORT sets bit n for every n in ``self.report_bits``."""

    feature_ids: tuple[int, ...] = (v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
                   v.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
                   v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT)

    def __init__(self) -> None:
        self.started: tuple[int, list[tuple[int, int]]] | None = None
        self.report_bits: list[int] = []
        self.reports: list[tuple[int, int, int]] = []

    def directions(self, feature: int) -> int:
        if feature == v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT:
            return v.VFIO_DEVICE_FEATURE_GET
        return v.VFIO_DEVICE_FEATURE_SET

    def handle(self, feature: int, flags: int, payload: memoryview) -> None:
        if feature == v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START:
            ctl = v.vfio_device_feature_dma_logging_control.from_buffer(payload)
            if ctl.num_ranges > 4:
                raise fail(errno.E2BIG, "DMA_LOGGING_START", "", "more than 4 ranges")
            arr = (v.vfio_device_feature_dma_logging_range * ctl.num_ranges).from_address(
                ctl.ranges)
            self.started = (ctl.page_size, [(r.iova, r.length) for r in arr])
            ctl.page_size = max(ctl.page_size, 0x10000)        # the driver's granule
        elif feature == v.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP:
            self.started = None
        else:
            rep = v.vfio_device_feature_dma_logging_report.from_buffer(payload)
            if self.started is None:
                raise fail(errno.EINVAL, "DMA_LOGGING_REPORT", "", "not started")
            self.reports.append((rep.iova, rep.length, rep.page_size))
            npages = -(-rep.length // rep.page_size)
            words = (ctypes.c_uint64 * (-(-npages // 64))).from_address(rep.bitmap)
            for n in self.report_bits:
                words[n // 64] |= 1 << (n % 64)


@dataclass
class Rig:
    host: SimHost
    paths: HostPaths

    @property
    def kernel(self):  # noqa: ANN201 (SimKernel)
        return self.host.kernel

    def parts(self, name: str) -> DeviceParts:
        return self.host.device(name).parts


def build_parts(spec: DeviceSpec, fdt: FdTable) -> DeviceParts:
    parts = DeviceParts()
    if spec.kind == "pci":
        parts.regions.append(VendorRegion())
    if spec.migration == "v2":
        parts.features.append(MigFeatures(spec, fdt))
    if spec.dma_logging:
        parts.features.append(LogFeatures())
    return parts


def build_rig(root: Path, **config: object) -> Rig:
    from vfiod.kernel.sim import SimHostConfig

    host = SimHost.build(root, {
        10: [DeviceSpec(PCI, mig_flags=v.VFIO_MIGRATION_STOP_COPY | v.VFIO_MIGRATION_PRE_COPY,
                        dma_logging=True, state_size=12345)],
        11: [DeviceSpec(BLOCKED, migration="none"), HostDevice(SIBLING)],
        12: [HostDevice(FOREIGN, driver="mlx5_core", vendor=0x15B3, device=0x101D)],
        13: [DeviceSpec(MDEV, kind="mdev", migration="none")],
        14: [DeviceSpec(PCI2, migration="none", driver="mlx5_vfio_pci")],
    }, config=SimHostConfig(**config), build_parts=build_parts)  # type: ignore[arg-type]
    return Rig(host, HostPaths(sysfs_root=host.sysfs_root, dev_root=host.dev_root))


@pytest.fixture(name="rig")
def rig_fixture(tmp_path: Path) -> Iterator[Rig]:
    """Import ``rig_fixture`` to get the ``rig`` fixture: a fresh host per test, checked
    for leaked fds at the end."""
    r = build_rig(tmp_path)
    yield r
    leaked = r.kernel.open_files()
    r.host.close()
    assert not leaked, f"fds left open: {leaked}"


@dataclass
class Opened:
    container: Container
    group: Group
    device: Device


def open_device(r: Rig, name: str) -> Opened:
    c = Container.open(r.kernel, r.paths)
    g = Group.open(r.kernel, r.paths, GROUP[name])
    g.set_container(c)
    c.set_iommu()
    return Opened(c, g, g.get_device(name))
