"""The dirty-page provider protocol and the DMA address space it tracks (docs/architecture.md §3).

A *provider* answers "which pages of this IOVA range did DMA write since I last asked?"
for one container-like DMA address space. Four kinds exist, chosen per container by
``select.py``: device DMA logging (docs/kernel-contract.md §7), type1 container tracking (§3.9),
iommufd HWPT tracking (§4.4) and "none" (every mapped page is always dirty). They share
one protocol so the tracker merges their bitmaps the same way:

* ``start(ranges, page_size) -> int``: begin tracking the (iova, length) ranges; returns
  the page size of the bitmaps ``report`` will return (type1 imposes the IOMMU's minimum
  page size; the others use the one asked for).
* ``report(iova, length, out) -> bitmap``: read-and-clear; u64 words, bit ``i`` = page
  ``iova + i * page_size`` (relative to ``iova``, the kernels' layout).
* ``unmap(iova, size) -> bitmap``: remove the mapping(s) in that range *and* return their
  final dirty bits, so an unmap during migration loses nothing.
* ``stop()``: end tracking; idempotent.

A kernel that does not implement a provider answers EOPNOTSUPP or ENOTTY (the 6.12 guest
kernel answers EOPNOTSUPP to DMA_LOGGING_REPORT, docs/testing.md): providers turn exactly
those into ``ProviderUnavailable`` so the tracker falls back to the next provider instead
of failing the migration. Every other errno stays a ``KernelError``.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from vfiod.errors import KernelError, VfiodError
from vfiod.vfio.bitmap import Bitmap, words_for
from vfiod.vfio.container import Container, DmaMapping
from vfiod.vfio.device import Device
from vfiod.vfio.iommufd import Iommufd

#: (iova, length) in bytes
IovaRange = tuple[int, int]

#: errnos meaning "this kernel/driver does not do that" (docs/kernel-contract.md §7, §8, §4.3)
UNAVAILABLE_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOTTY})



class ProviderName(enum.StrEnum):
    """The providers, in ``select``'s order of preference: the one place their names (in
    status, metrics, logs and ``TrackedContainer.disable``) are written."""

    DEVICE_LOGGING = "device-logging"
    TYPE1 = "type1"
    IOMMUFD = "iommufd"
    NONE = "none"


class ProviderUnavailable(VfiodError):
    """The kernel said this provider cannot work here (EOPNOTSUPP/ENOTTY); fall back."""

    def __init__(self, provider: str, op: str, target: str, err: int, detail: str = "") -> None:
        self.provider = provider
        self.op = op
        self.target = target
        self.errno = err
        self.detail = detail
        # the kernel's uAPI says EOPNOTSUPP; Python's table names the same number ENOTSUP
        name = "EOPNOTSUPP" if err == errno.EOPNOTSUPP else errno.errorcode.get(err, str(err))
        extra = f" ({detail})" if detail else ""
        super().__init__(f"{provider} dirty tracking unavailable: {op} on {target}: "
                         f"{name}{extra}")

    @classmethod
    def from_kernel(cls, provider: str, e: KernelError) -> ProviderUnavailable:
        return cls(provider, e.op, e.target, e.errno or errno.EIO, e.detail)


def unavailable(provider: str, e: KernelError) -> BaseException:
    """``ProviderUnavailable`` for EOPNOTSUPP/ENOTTY, else ``e`` itself (to re-raise)."""
    if e.errno in UNAVAILABLE_ERRNOS:
        return ProviderUnavailable.from_kernel(provider, e)
    return e


@runtime_checkable
class DirtyProvider(Protocol):
    name: ProviderName
    #: True when the bitmaps show only pages really written; False when the provider
    #: over-reports (type1 with an IOMMU-backed device, "none")
    precise: bool
    #: page size of the bitmaps, set by ``start`` (None before)
    page_size: int | None
    #: why this provider was chosen (for status)
    reason: str

    def start(self, ranges: Sequence[IovaRange], page_size: int) -> int: ...

    def report(self, iova: int, length: int, out: Bitmap | None = None) -> Bitmap: ...

    def unmap(self, iova: int, size: int) -> Bitmap: ...

    def stop(self) -> None: ...


@dataclass
class IommufdSpace:
    """An iommufd IOAS whose devices are attached to one HWPT (docs/kernel-contract.md §4.1)."""

    iommufd: Iommufd
    ioas_id: int
    hwpt_id: int | None = None
    #: the HWPT was allocated with IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    dirty_capable: bool = False
    #: the live IOAS mappings, kept by ``DmaSpace.unmap`` and the owner
    mappings: list[DmaMapping] = field(default_factory=list)


@dataclass
class DmaSpace:
    """One DMA address space whose dirty pages are tracked as a unit: a type1 container
    (``type1``) or an iommufd IOAS (``iommufd``), with the devices that DMA into it."""

    name: str
    devices: Sequence[Device] = ()
    type1: Container | None = None
    iommufd: IommufdSpace | None = None

    def __post_init__(self) -> None:
        if (self.type1 is None) == (self.iommufd is None):
            raise ValueError(f"DmaSpace {self.name!r}: give exactly one of type1 (a "
                             "Container) or iommufd (an IommufdSpace)")

    def unmap(self, iova: int, size: int) -> None:
        """Plain unmap of whole mappings in [iova, iova+size) on whichever backend."""
        if self.type1 is not None:
            self.type1.unmap_dma(iova, size)
            return
        assert self.iommufd is not None
        sp = self.iommufd
        sp.iommufd.ioas_unmap(sp.ioas_id, iova, size)
        end = iova + size
        sp.mappings = [m for m in sp.mappings if not (m.iova >= iova and m.end <= end)]

    def is_mapped(self, iova: int) -> bool:
        """Whether a live mapping starts at ``iova`` (after a failed unmap: did it go?)."""
        if self.type1 is not None:
            return any(m.iova == iova for m in self.type1.mappings)
        assert self.iommufd is not None
        return any(m.iova == iova for m in self.iommufd.mappings)


def ones(npages: int, out: Bitmap | None = None) -> Bitmap:
    """A bitmap with bits [0, npages) set and the tail of the last word clear."""
    nwords = words_for(npages)
    if out is None or out.size < nwords:
        out = np.empty(nwords, dtype=np.uint64)
    out[:nwords] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
    tail = npages % 64
    if tail:
        out[nwords - 1] = np.uint64((1 << tail) - 1)
    return out[:nwords]


def check_report_args(provider: str, iova: int, length: int, page_size: int | None) -> int:
    """The page size to report with; refuses a provider that was not started."""
    if page_size is None:
        raise RuntimeError(f"{provider} dirty tracking: report/unmap of iova {iova:#x} "
                           "before start()")
    if length <= 0 or iova < 0:
        raise ValueError(f"{provider} dirty tracking: bad range iova {iova:#x} length "
                         f"{length:#x} (need iova >= 0 and length > 0)")
    if iova % page_size or length % page_size:
        raise ValueError(f"{provider} dirty tracking: range iova {iova:#x} length {length:#x} "
                         f"is not aligned to the {page_size:#x}-byte tracking page")
    return page_size
