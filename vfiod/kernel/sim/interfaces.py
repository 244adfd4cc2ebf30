"""Contracts between the parts of the simulated kernel.

``device.py`` (the device fd) is generic; what a device can do comes from parts plugged
into it, each built by ``vfiod.kernel.sim.migration`` (v2 state machine, v1 region, DMA
logging) from a ``DeviceSpec``:

* ``FeatureHandler``: answers ``VFIO_DEVICE_FEATURE`` for the feature ids it owns
  (docs/kernel-contract.md §6.1). The device fd validates argsz/flags common to all features
  (GET+SET together, unknown bits, PROBE) and answers ENOTTY for features no handler owns.
* ``SimRegion``: a device region beyond the fixed vfio-pci ones (the v1 migration region,
  docs/kernel-contract.md §5), with its capability chain and pread/pwrite/mmap.
* ``DmaListener``: told about simulated device DMA writes (DMA logging sets bits; type1
  marks pages dirty for pinned-scope devices, docs/kernel-contract.md §3.9).
* ``Resettable``: VFIO_DEVICE_RESET returns every part to its power-on state.
* ``Closable``: the last close of the device fd also ends what a reset keeps (DMA logging).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from vfiod.kernel.sim.base import FaultInjector, SimFile


@runtime_checkable
class FeatureHandler(Protocol):
    #: feature ids (bits 0-15 of vfio_device_feature.flags) this handler owns
    feature_ids: tuple[int, ...]

    def directions(self, feature: int) -> int:
        """The GET/SET flag bits (VFIO_DEVICE_FEATURE_GET|SET) supported for ``feature``."""
        ...

    def handle(self, feature: int, flags: int, payload: memoryview) -> None:
        """Run one GET or SET; ``payload`` is the bytes after the 8-byte header (argsz - 8),
        writable for GET answers. Raise KernelError with the kernel's errno on failure."""
        ...


@runtime_checkable
class SimRegion(Protocol):
    index: int
    size: int
    flags: int                   # VFIO_REGION_INFO_FLAG_*
    def caps(self) -> list[bytes]:
        """Each capability's bytes starting with its vfio_info_cap_header (``next`` = 0);
        the device fd chains them and fixes up ``next``."""
        ...
    def pread(self, length: int, offset: int) -> bytes: ...
    def pwrite(self, data: bytes, offset: int) -> int: ...
    def mmap(self, length: int, offset: int, prot: int) -> object: ...


class DmaListener(Protocol):
    def on_dma_write(self, iova: int, length: int) -> None: ...


class Resettable(Protocol):
    def reset(self) -> None: ...


class Closable(Protocol):
    """Told when the last fd of the device is closed, after the resettables: state that
    survives VFIO_DEVICE_RESET but not a close (a device DMA-logging session)."""

    def on_close(self) -> None: ...


@dataclass(frozen=True)
class DeviceSpec:
    """What a simulated device is. ``migration``: "none", "v1", or "v2"; ``mig_flags``:
    VFIO_MIGRATION_* bits for v2. ``kind``: "pci" (a vfio-pci VF behind a real IOMMU:
    type1 reports it all-dirty) or "mdev" (emulated IOMMU: pinned-page scope)."""

    name: str                        # BDF "0000:3b:00.1" or an mdev UUID
    kind: str = "pci"
    migration: str = "v2"
    mig_flags: int = 0
    dma_logging: bool = False
    state_size: int = 64 * 1024      # bytes of device state saved in STOP_COPY
    precopy_size: int = 256 * 1024   # initial bytes offered in PRE_COPY
    dirty_rate: int = 4096           # device state bytes re-dirtied per model tick while running
    seed: int = 1
    vendor: int = 0x15B3
    device: int = 0x101E
    driver: str = "vfio-pci"         # sysfs driver link name (variant drivers differ)
    extra: dict[str, object] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class DeviceParts:
    """What ``vfiod.kernel.sim.migration.build_parts`` returns for one device."""

    features: list[FeatureHandler] = field(default_factory=list)
    regions: list[SimRegion] = field(default_factory=list)
    dma_listeners: list[DmaListener] = field(default_factory=list)
    resettables: list[Resettable] = field(default_factory=list)
    closables: list[Closable] = field(default_factory=list)
    #: the device model (state that changes while RUNNING; save/restore compares equal)
    model: object | None = None
    #: the v2 state as the driver's ``migration_get_state`` reads it, without an fd (what
    #: debugfs prints, docs/kernel-contract.md §12); None: no v2 migration ops
    mig_state: Callable[[], int] | None = None


class FdTable(Protocol):
    """What parts need from the kernel: install a new file (a data fd) and faults."""

    faults: FaultInjector

    def install(self, file: SimFile) -> int:
        """Give ``file`` a new fd number (like anon_inode_getfd with O_CLOEXEC)."""
        ...


#: Signature of ``vfiod.kernel.sim.migration.build_parts``.
BuildParts = Callable[[DeviceSpec, FdTable], DeviceParts]
