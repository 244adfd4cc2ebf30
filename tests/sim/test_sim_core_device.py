"""The simulated device fd: info, regions (two-call capability chains), region access and
mmap, IRQs, reset and the generic VFIO_DEVICE_FEATURE rules (docs/kernel-contract.md §3.3 - §3.5,
§6.1), with stand-in parts so the generic layer is tested on its own."""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import vfiod.abi.vfio as v
from vfiod.abi.layout import parse_caps
from vfiod.errors import KernelError
from vfiod.kernel.sim import SimHost, SimHostConfig, Type1Config
from vfiod.kernel.sim.interfaces import DeviceParts, DeviceSpec
from vfiod.kernel.sim.rawvfio import RawVfio, feature, open_device

BDF = "0000:3b:00.1"
UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
GET, SET, PROBE = v.VFIO_DEVICE_FEATURE_GET, v.VFIO_DEVICE_FEATURE_SET, v.VFIO_DEVICE_FEATURE_PROBE
RW = v.VFIO_REGION_INFO_FLAG_READ | v.VFIO_REGION_INFO_FLAG_WRITE


class FakeRegion:
    """A device-specific region (index 9) with a TYPE and a SPARSE_MMAP capability."""

    index, size = 9, 0x2000
    flags = RW | v.VFIO_REGION_INFO_FLAG_MMAP
    lead_cap = b""              # an optional first capability (e.g. one of 12 bytes)

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def caps(self) -> list[bytes]:
        t = v.vfio_region_info_cap_type(
            header=v.vfio_info_cap_header(id=v.VFIO_REGION_INFO_CAP_TYPE, version=1),
            type=3, subtype=1)
        sparse = v.vfio_region_info_cap_sparse_mmap(
            header=v.vfio_info_cap_header(id=v.VFIO_REGION_INFO_CAP_SPARSE_MMAP, version=1),
            nr_areas=1)
        area = v.vfio_region_sparse_mmap_area(offset=0x1000, size=0x1000)
        caps = [bytes(t), bytes(sparse) + bytes(area)]
        return [self.lead_cap, *caps] if self.lead_cap else caps

    def pread(self, length: int, offset: int) -> bytes:
        self.calls.append(("pread", length, offset))
        return b"r" * length

    def pwrite(self, data: bytes, offset: int) -> int:
        self.calls.append(("pwrite", data, offset))
        return len(data)

    def mmap(self, length: int, offset: int, prot: int) -> object:
        self.calls.append(("mmap", length, offset))
        return "mapping"


class FakeFeatures:
    """Owns MIGRATION (GET) and MIG_DEVICE_STATE (GET|SET); GET fills the payload."""

    feature_ids: tuple[int, ...] = (v.VFIO_DEVICE_FEATURE_MIGRATION,
                                    v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE)

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def directions(self, feature: int) -> int:
        return GET if feature == v.VFIO_DEVICE_FEATURE_MIGRATION else GET | SET

    def handle(self, feature: int, flags: int, payload: memoryview) -> None:
        self.calls.append((feature, flags, len(payload)))
        if flags & GET:
            payload[:] = bytes(range(len(payload)))


class Resets:
    count = 0

    def reset(self) -> None:
        self.count += 1


def make_host(tmp_path: Path, **config: object) -> SimHost:
    fakes: dict[str, tuple[FakeRegion, FakeFeatures, Resets]] = {}

    def parts(spec: DeviceSpec, fds: object) -> DeviceParts:
        if spec.kind == "mdev":
            return DeviceParts()
        region, feats, resets = fakes[spec.name] = FakeRegion(), FakeFeatures(), Resets()
        return DeviceParts(features=[feats], regions=[region], resettables=[resets])

    specs = [[DeviceSpec(BDF)], [DeviceSpec(UUID, kind="mdev")],
             [DeviceSpec("0000:3b:00.2", extra={"reset": False, "unknown_feature_errno": 22})]]
    h = SimHost.build(tmp_path, specs, build_parts=parts,
                      config=SimHostConfig(**config))  # type: ignore[arg-type]
    h.fakes = fakes[BDF]  # type: ignore[attr-defined]
    return h


@pytest.fixture
def dev(tmp_path: Path):
    h = make_host(tmp_path)
    raw = open_device(h.kernel, h.dev_root, 10, BDF)
    yield h, raw
    raw.close()
    h.close()


def errno_of(call: Callable[..., object], *args: object, **kwargs: object) -> int:
    with pytest.raises(KernelError) as e:
        call(*args, **kwargs)
    return e.value.errno


def region_info(h: SimHost, fd: int, index: int) -> tuple[v.vfio_region_info, bytearray]:
    first = v.vfio_region_info(argsz=32, index=index)
    h.kernel.ioctl(fd, v.VFIO_DEVICE_GET_REGION_INFO, first)
    if not first.flags & v.VFIO_REGION_INFO_FLAG_CAPS:
        return first, bytearray(bytes(first))
    assert first.cap_offset == 0 and first.argsz > 32
    buf = bytearray(first.argsz)
    info = v.vfio_region_info.from_buffer(buf)
    info.argsz, info.index = len(buf), index
    h.kernel.ioctl(fd, v.VFIO_DEVICE_GET_REGION_INFO, buf)
    assert info.cap_offset == 32
    return info, buf


# -- info -------------------------------------------------------------------------------------

def test_device_info(dev) -> None:
    h, raw = dev
    info = v.vfio_device_info(argsz=24, cap_offset=77)
    h.kernel.ioctl(raw.device, v.VFIO_DEVICE_GET_INFO, info)
    assert info.flags == v.VFIO_DEVICE_FLAGS_PCI | v.VFIO_DEVICE_FLAGS_RESET
    assert (info.num_regions, info.num_irqs, info.cap_offset) == (10, 5, 0)
    short = bytearray(b"\xee" * 24)
    struct.pack_into("<I", short, 0, 16)
    h.kernel.ioctl(raw.device, v.VFIO_DEVICE_GET_INFO, short)     # 6.1-era caller
    assert short[16:] == b"\xee" * 8
    assert errno_of(lambda: h.kernel.ioctl(raw.device, v.VFIO_DEVICE_GET_INFO,
                                           v.vfio_device_info(argsz=15))) == errno.EINVAL
    assert errno_of(lambda: h.kernel.ioctl(raw.device, v.VFIO_DEVICE_GET_INFO, 0)) == errno.EFAULT


def test_fixed_regions(dev) -> None:
    h, raw = dev
    bar0, buf = region_info(h, raw.device, v.VFIO_PCI_BAR0_REGION_INDEX)
    assert bar0.size == 1 << 20 and bar0.offset == 0
    assert bar0.flags == RW | v.VFIO_REGION_INFO_FLAG_MMAP | v.VFIO_REGION_INFO_FLAG_CAPS
    assert [c[0] for c in parse_caps(buf, 32, 32)] == [v.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE]
    cfg, _ = region_info(h, raw.device, v.VFIO_PCI_CONFIG_REGION_INDEX)
    assert (cfg.size, cfg.flags, cfg.offset) == (4096, RW, 7 << 40)
    rom, _ = region_info(h, raw.device, v.VFIO_PCI_ROM_REGION_INDEX)
    assert rom.size == 0
    for bad in (10, 1000):
        assert errno_of(region_info, h, raw.device, bad) == errno.EINVAL
    assert errno_of(lambda: h.kernel.ioctl(raw.device, v.VFIO_DEVICE_GET_REGION_INFO,
                                           bytearray(31))) == errno.EFAULT
    short = v.vfio_region_info(argsz=31, index=0)
    assert errno_of(lambda: h.kernel.ioctl(raw.device, v.VFIO_DEVICE_GET_REGION_INFO, short)) \
        == errno.EINVAL


def test_device_region_caps_are_chained(dev) -> None:
    h, raw = dev
    info, buf = region_info(h, raw.device, 9)
    assert info.size == 0x2000 and info.offset == 9 << 40
    caps = parse_caps(buf, info.cap_offset, 32)
    assert [(c[0], c[2]) for c in caps] == [(v.VFIO_REGION_INFO_CAP_TYPE, 32),
                                            (v.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 48)]
    t = v.vfio_region_info_cap_type.from_buffer_copy(buf, 32)
    assert (t.type, t.subtype) == (3, 1)
    area = v.vfio_region_sparse_mmap_area.from_buffer_copy(buf, 48 + 16)
    assert (area.offset, area.size) == (0x1000, 0x1000)
    assert len(buf) == 32 + 16 + 32


def test_device_info_on_an_mdev(tmp_path: Path) -> None:
    h = make_host(tmp_path)
    raw = open_device(h.kernel, h.dev_root, 11, UUID)
    info = v.vfio_device_info(argsz=24)
    h.kernel.ioctl(raw.device, v.VFIO_DEVICE_GET_INFO, info)
    assert info.num_regions == v.VFIO_PCI_NUM_REGIONS
    bar0, _ = region_info(h, raw.device, 0)
    assert (bar0.size, bar0.flags) == (8, RW)          # an I/O BAR like mtty's: no mmap
    assert errno_of(lambda: h.kernel.mmap(raw.device, 4096, 0)) == errno.EINVAL
    raw.close()


# -- region access ------------------------------------------------------------------------------

def test_config_space(dev) -> None:
    h, raw = dev
    k, cfg = h.kernel, 7 << 40
    assert struct.unpack("<HH", k.pread(raw.device, 4, cfg)) == (0x15B3, 0x101E)
    assert k.pwrite(raw.device, b"\xff\xff\xff\xff\x06\x00", cfg) == 6   # ids are read-only
    assert k.pread(raw.device, 6, cfg) == b"\xb3\x15\x1e\x10\x06\x00"
    assert k.pread(raw.device, 16, cfg + 4090) == k.pread(raw.device, 6, cfg + 4090)  # clipped
    assert errno_of(lambda: k.pread(raw.device, 4, cfg + 4096)) == errno.EINVAL
    assert errno_of(lambda: k.pread(raw.device, 4, 10 << 40)) == errno.EINVAL


def test_bar_mmap_and_pread_share_memory(dev) -> None:
    h, raw = dev
    k = h.kernel
    m = k.mmap(raw.device, 8192, 4096)
    m[0:4] = b"ping"
    assert k.pread(raw.device, 4, 4096) == b"ping"
    into = bytearray(6)
    assert k.pread_into(raw.device, into, 4096) == 6 and into[:4] == b"ping"
    k.pwrite(raw.device, b"pong", 8192)
    assert m[4096:4100] == b"pong"
    m.close()
    for length, off in ((8192, (1 << 20) - 4096), (4096, 100), (0, 0), (4096, 7 << 40)):
        assert errno_of(k.mmap, raw.device, length, off) == errno.EINVAL


def test_device_region_access_is_dispatched(dev) -> None:
    h, raw = dev
    region = h.fakes[0]
    k, base = h.kernel, 9 << 40
    assert k.pread(raw.device, 3, base + 5) == b"rrr"
    assert k.pwrite(raw.device, b"xy", base + 7) == 2
    assert k.mmap(raw.device, 4096, base + 4096) == "mapping"
    assert region.calls == [("pread", 3, 5), ("pwrite", b"xy", 7), ("mmap", 4096, 4096)]


# -- IRQs and reset -----------------------------------------------------------------------------

def test_irq_info(dev) -> None:
    h, raw = dev
    info = v.vfio_irq_info(argsz=16, index=v.VFIO_PCI_INTX_IRQ_INDEX)
    h.kernel.ioctl(raw.device, v.VFIO_DEVICE_GET_IRQ_INFO, info)
    assert info.flags == (v.VFIO_IRQ_INFO_EVENTFD | v.VFIO_IRQ_INFO_MASKABLE
                          | v.VFIO_IRQ_INFO_AUTOMASKED) and info.count == 1
    info = v.vfio_irq_info(argsz=16, index=v.VFIO_PCI_MSIX_IRQ_INDEX)
    h.kernel.ioctl(raw.device, v.VFIO_DEVICE_GET_IRQ_INFO, info)
    assert info.flags == v.VFIO_IRQ_INFO_EVENTFD | v.VFIO_IRQ_INFO_NORESIZE and info.count == 8
    for bad in (v.vfio_irq_info(argsz=15, index=0), v.vfio_irq_info(argsz=16, index=5)):
        assert errno_of(h.kernel.ioctl, raw.device, v.VFIO_DEVICE_GET_IRQ_INFO, bad) \
            == errno.EINVAL


def set_irqs(h: SimHost, raw: RawVfio, flags: int, index: int, start: int, count: int,
             data: bytes = b"", argsz: int | None = None) -> None:
    buf = bytearray(20 + len(data))
    hdr = v.vfio_irq_set.from_buffer(buf)
    hdr.argsz = len(buf) if argsz is None else argsz
    hdr.flags, hdr.index, hdr.start, hdr.count = flags, index, start, count
    buf[20:] = data
    h.kernel.ioctl(raw.device, v.VFIO_DEVICE_SET_IRQS, buf)


def test_set_irqs_validation(dev) -> None:
    h, raw = dev
    efd, trig = v.VFIO_IRQ_SET_DATA_EVENTFD, v.VFIO_IRQ_SET_ACTION_TRIGGER
    msix = v.VFIO_PCI_MSIX_IRQ_INDEX
    fds = struct.pack("=ii", -1, -1)
    bad: list[dict] = [
        dict(flags=efd | trig, index=msix, start=0, count=2, data=fds, argsz=19),
        dict(flags=efd | trig | 0x40, index=msix, start=0, count=2, data=fds),
        dict(flags=efd | v.VFIO_IRQ_SET_DATA_BOOL | trig, index=msix, start=0, count=2, data=fds),
        dict(flags=efd | trig, index=msix, start=8, count=0),
        dict(flags=efd | trig, index=msix, start=7, count=2, data=fds),
        dict(flags=efd | trig, index=msix, start=0, count=3, data=fds),      # data too short
        dict(flags=efd | trig, index=9, start=0, count=1, data=fds[:4]),
    ]
    for case in bad:
        assert errno_of(set_irqs, h, raw, **case) == errno.EINVAL, case
    mask = v.VFIO_IRQ_SET_DATA_NONE | v.VFIO_IRQ_SET_ACTION_MASK
    assert errno_of(lambda: set_irqs(h, raw, mask, msix, 0, 1)) == errno.ENOTTY
    set_irqs(h, raw, mask, v.VFIO_PCI_INTX_IRQ_INDEX, 0, 1)


def test_irq_eventfds_are_signalled(dev) -> None:
    h, raw = dev
    k, node = h.kernel, h.device(BDF)
    efd = k.eventfd()
    flags = v.VFIO_IRQ_SET_DATA_EVENTFD | v.VFIO_IRQ_SET_ACTION_TRIGGER
    set_irqs(h, raw, flags, v.VFIO_PCI_MSIX_IRQ_INDEX, 2, 1, struct.pack("=i", efd))
    assert node.signal_irq(v.VFIO_PCI_MSIX_IRQ_INDEX, 2)
    assert not node.signal_irq(v.VFIO_PCI_MSIX_IRQ_INDEX, 3)
    none_trigger = v.VFIO_IRQ_SET_DATA_NONE | v.VFIO_IRQ_SET_ACTION_TRIGGER
    set_irqs(h, raw, none_trigger, v.VFIO_PCI_MSIX_IRQ_INDEX, 2, 1)     # loopback trigger
    assert struct.unpack("=Q", k.read(efd, 8))[0] == 2
    set_irqs(h, raw, none_trigger, v.VFIO_PCI_MSIX_IRQ_INDEX, 0, 0)     # disable
    assert not node.signal_irq(v.VFIO_PCI_MSIX_IRQ_INDEX, 2)
    k.close(efd)


def test_reset_returns_parts_and_config_to_power_on(dev) -> None:
    h, raw = dev
    resets = h.fakes[2]
    k = h.kernel
    k.pwrite(raw.device, b"\x06\x00", (7 << 40) + 4)
    k.ioctl(raw.device, v.VFIO_DEVICE_RESET, 0)
    assert resets.count == 1
    assert k.pread(raw.device, 2, (7 << 40) + 4) == b"\x00\x00"


def test_reset_without_the_reset_flag_is_einval(tmp_path: Path) -> None:
    h = make_host(tmp_path)
    raw = open_device(h.kernel, h.dev_root, 12, "0000:3b:00.2")
    info = v.vfio_device_info(argsz=24)
    h.kernel.ioctl(raw.device, v.VFIO_DEVICE_GET_INFO, info)
    assert not info.flags & v.VFIO_DEVICE_FLAGS_RESET
    assert errno_of(lambda: h.kernel.ioctl(raw.device, v.VFIO_DEVICE_RESET, 0)) == errno.EINVAL
    raw.close()


# -- VFIO_DEVICE_FEATURE ------------------------------------------------------------------------

def test_feature_generic_rules(dev) -> None:
    h, raw = dev
    k, fd = h.kernel, raw.device
    mig, state = v.VFIO_DEVICE_FEATURE_MIGRATION, v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    handler = h.fakes[1]

    def call(buf: bytearray) -> int:
        return k.ioctl(fd, v.VFIO_DEVICE_FEATURE, buf)

    short = v.feature_buffer(mig, GET, 8)
    struct.pack_into("<I", short, 0, 7)
    assert errno_of(lambda: call(short)) == errno.EINVAL                     # argsz < 8
    unknown_bit = v.feature_buffer(mig, GET, 8)
    struct.pack_into("<I", unknown_bit, 4, GET | mig | (1 << 19))
    assert errno_of(lambda: call(unknown_bit)) == errno.EINVAL
    assert errno_of(lambda: feature(k, fd, state, GET | SET, 8)) == errno.EINVAL
    assert errno_of(lambda: feature(k, fd, state, 0, 8)) == errno.EINVAL      # no direction
    assert errno_of(lambda: feature(k, fd, v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
                                    PROBE | SET)) == errno.ENOTTY
    assert errno_of(lambda: feature(k, fd, mig, PROBE | SET)) == errno.EINVAL  # GET-only
    assert errno_of(lambda: feature(k, fd, mig, SET, 8)) == errno.EINVAL
    feature(k, fd, mig, PROBE | GET)
    feature(k, fd, state, PROBE | GET | SET)
    feature(k, fd, mig, PROBE)
    assert handler.calls == []                                               # none reached it
    out = feature(k, fd, mig, GET, 8)
    assert out[8:] == bytes(range(8))
    assert handler.calls == [(mig, GET | mig, 8)]
    lying = v.feature_buffer(mig, GET, 8)
    struct.pack_into("<I", lying, 0, 64)                     # argsz beyond the buffer
    assert errno_of(lambda: call(lying)) == errno.EFAULT


def test_unknown_feature_errno_follows_the_spec(tmp_path: Path) -> None:
    h = make_host(tmp_path)
    raw = open_device(h.kernel, h.dev_root, 12, "0000:3b:00.2")
    assert errno_of(lambda: feature(h.kernel, raw.device, 42, GET, 8)) == errno.EINVAL
    raw.close()


def test_fault_at_a_named_feature(dev) -> None:
    h, raw = dev
    k = h.kernel
    k.faults.inject(f"feature:MIGRATION@{BDF}", errno.EIO)
    with pytest.raises(KernelError) as e:
        feature(k, raw.device, v.VFIO_DEVICE_FEATURE_MIGRATION, GET, 8)
    assert e.value.errno == errno.EIO
    feature(k, raw.device, v.VFIO_DEVICE_FEATURE_MIGRATION, GET, 8)
    assert f"feature:MIGRATION@{BDF}" in k.faults.log


@pytest.mark.parametrize("align8, offsets", [(True, [32, 48, 64]), (False, [32, 44, 60])])
def test_capability_padding_follows_the_kernel_version(tmp_path: Path, monkeypatch,
                                                       align8: bool, offsets: list[int]) -> None:
    twelve = bytes(v.vfio_info_cap_header(id=0x99, version=1)) + b"\1\2\3\4"
    monkeypatch.setattr(FakeRegion, "lead_cap", twelve)
    h = make_host(tmp_path, type1=Type1Config(caps_align8=align8))
    raw = open_device(h.kernel, h.dev_root, 10, BDF)
    info, buf = region_info(h, raw.device, 9)
    caps = parse_caps(buf, info.cap_offset, 32)
    assert [c[2] for c in caps] == offsets             # 6.6+ pads to 8; before, 4
    assert buf[32 + 8:32 + 12] == b"\1\2\3\4"
    assert [c[0] for c in caps] == [0x99, v.VFIO_REGION_INFO_CAP_TYPE,
                                    v.VFIO_REGION_INFO_CAP_SPARSE_MMAP]
    raw.close()


def test_group_path_device_refuses_cdev_requests(dev) -> None:
    h, raw = dev
    att = v.vfio_device_attach_iommufd_pt(argsz=12, pt_id=1)
    assert errno_of(lambda: h.kernel.ioctl(raw.device, v.VFIO_DEVICE_ATTACH_IOMMUFD_PT, att)) \
        == errno.EINVAL
    bind = v.vfio_device_bind_iommufd(argsz=16, iommufd=3)
    assert errno_of(lambda: h.kernel.ioctl(raw.device, v.VFIO_DEVICE_BIND_IOMMUFD, bind)) \
        == errno.ENOTTY
    assert ctypes.sizeof(bind) == 16
