"""The per-guest dirty tracker: every container's provider merged into one bitmap over
guest-physical pages (design.md §3, §4; vfio-uapi.md §3.8, §3.9, §4.4, §7).

A guest is a set of RAM regions (guest-physical address, size) and one or more DMA
spaces (containers), each mapping IOVA ranges onto guest memory. ``sync`` pulls each
container's bitmap through its provider and OR-merges it into the guest's
``GlobalBitmap`` at each mapping's guest page (which need not be a multiple of 64),
rescaling when the IOMMU page differs from the guest page. The RAM sender takes what is
dirty with ``take_dirty_runs``.

No dirty bit is lost:
* unmapping a range while tracking goes through the provider (type1: UNMAP_DMA with
  GET_DIRTY_BITMAP), and its final bits are merged before the mapping leaves the layout;
* a provider that turns out unavailable (EOPNOTSUPP/ENOTTY) is replaced by the next one in
  its chain, and after any REPORT failure the whole container counts as dirty for that
  sync (the log may be lost), marked after the replacement started;
* the pre-copy opt-out (``optout.py``) skips the query; ``SyncResult.dirty_pages`` then
  counts the container's whole mapped range (``assumed_dirty_pages``) so the predictor and
  status never treat it as clean, but those pages are not put in the bitmap, so pre-copy
  does not re-send them every pass. The kernel keeps logging meanwhile, and the first
  sync after the opted-out devices stopped (stop-and-copy) collects all of it.

Mappings that are contiguous in both IOVA and guest address are queried as one segment
(one ioctl and one merge), with a per-container scratch bitmap reused across syncs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vfiod.dirty import bitmap_kernels as kernels
from vfiod.dirty.bitmap_args import rescaled_nbits
from vfiod.dirty.global_bitmap import DirtyRate, GlobalBitmap
from vfiod.dirty.optout import OptOut, StateSource, state_lookup
from vfiod.dirty.providers.base import (
    Bitmap,
    DirtyProvider,
    DmaSpace,
    IovaRange,
    ProviderName,
    ProviderUnavailable,
)
from vfiod.dirty.providers.chain import ProviderChain
from vfiod.dirty.providers.select import select
from vfiod.dirty.ranges import PageRange
from vfiod.errors import KernelError
from vfiod.vfio.container import DmaMapping


@dataclass(frozen=True)
class GuestRegion:
    """Guest RAM at guest-physical [gpa, gpa + size)."""

    gpa: int
    size: int
    name: str = ""


@dataclass
class TrackedContainer:
    """One DMA space of the guest, its mappings and its devices' opt-out settings."""

    space: DmaSpace
    mappings: Sequence[DmaMapping]
    #: device name -> False: QEMU's x-pre-copy-dirty-page-tracking=off (default: on)
    pre_copy_dirty_page_tracking: Mapping[str, bool] = field(default_factory=dict)
    #: provider names not to use, e.g. {"device-logging"}
    disable: Collection[str] = ()


@dataclass(frozen=True)
class SyncResult:
    phase: str
    dirty_pages: int            # guest pages dirty in the global bitmap after this sync
    dirty_bytes: int
    new_dirty_pages: int        # pages reported dirty by this sync (all containers)
    new_dirty_bytes: int
    duration_s: float           # measured with the tracker's clock
    providers: dict[str, str]   # container -> provider name used
    skipped: dict[str, str]     # container -> why it was not queried (counted all dirty)
    lost: dict[str, str]        # container -> why it counted all dirty after an error
    #: pages of opted-out containers not queried this sync: counted dirty (an upper bound,
    #: overlaps with the bitmap are not subtracted) but not in the bitmap, so pre-copy does
    #: not re-send them every pass; the stop-and-copy query collects what really changed.
    assumed_dirty_pages: int = 0
    assumed_dirty_bytes: int = 0


@dataclass
class _Segment:
    iova: int
    size: int
    first_page: int             # guest page of iova
    maps: list[DmaMapping]


class _Box:
    """Run-time state of one container."""

    def __init__(self, spec: TrackedContainer, maps: list[DmaMapping]) -> None:
        self.spec = spec
        self.name = spec.space.name
        self.maps = maps
        self.optout = OptOut.from_config([d.name for d in spec.space.devices],
                                         spec.pre_copy_dirty_page_tracking)
        self.chain: ProviderChain | None = None
        self.segments: list[_Segment] = []
        self.scratch: Bitmap | None = None
        self.last: str = "not synced"

    def ranges(self) -> list[IovaRange]:
        return [(m.iova, m.size) for m in self.maps]


class DirtyTracker:
    def __init__(self, regions: Sequence[GuestRegion], containers: Sequence[TrackedContainer],
                 page_size: int = 4096, device_states: StateSource | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if page_size < 4096 or page_size & (page_size - 1):
            raise ValueError(f"dirty tracker: guest page size {page_size:#x} must be a "
                             "power of two >= 4096")
        self.page_size = page_size
        self.regions = _check_regions(regions, page_size)
        self._states = state_lookup(device_states)
        self._clock = clock
        names = [c.space.name for c in containers]
        if len(set(names)) != len(names):
            raise ValueError(f"dirty tracker: container names must be unique, got {names}")
        self._boxes = [_Box(c, _check_mappings(c, self.regions, page_size)) for c in containers]
        end = max((r.gpa + r.size for r in self.regions), default=0)
        self.bitmap = GlobalBitmap(end // page_size, page_size)
        self.rate = DirtyRate(page_size)
        self._rate_t = 0.0
        self.running = False
        self.syncs = 0
        self.last_sync: SyncResult | None = None
        self._lock = threading.RLock()

    # -- lifecycle --------------------------------------------------------------------
    def start(self, initial_all_dirty: bool = True) -> None:
        """Start every container's provider (falling back down its chain as needed).
        ``initial_all_dirty``: mark all guest RAM dirty, for the first full pass."""
        with self._lock:
            if self.running:
                return
            try:
                for box in self._boxes:
                    disable = set(box.spec.disable)
                    if not box.maps:        # device logging needs ranges at START (§7)
                        disable.add(ProviderName.DEVICE_LOGGING)
                    box.chain = ProviderChain(select(box.spec.space, disable), box.name)
                    box.chain.start(box.ranges(), self.page_size)
                    self._resegment(box)
            except BaseException:
                self._stop_all()
                raise
            self.running = True
            self._rate_t = self._clock()
            self.rate.start(self._rate_t)
            if initial_all_dirty:
                for r in self.regions:
                    self.bitmap.mark_all(PageRange(r.gpa // self.page_size,
                                                   r.size // self.page_size))

    def stop(self) -> None:
        """Stop every provider, each even if another fails; idempotent. Raises the
        first STOP failure after all were tried."""
        with self._lock:
            self.running = False
            first = self._stop_all()
        if first is not None:
            raise first

    def _stop_all(self) -> BaseException | None:
        first: BaseException | None = None
        for box in self._boxes:
            if box.chain is None:
                continue
            try:
                box.chain.stop()
            except KernelError as e:
                first = first or e
        return first

    # -- sync -------------------------------------------------------------------------
    def sync(self, phase: str = "precopy") -> SyncResult:
        """Pull every container's dirty bits into the global bitmap."""
        with self._lock:
            if not self.running:
                raise RuntimeError("dirty tracker: sync() before start() or after stop()")
            t0 = self._clock()
            new = 0
            skipped: dict[str, str] = {}
            lost: dict[str, str] = {}
            assumed = 0
            for box in self._boxes:
                blockers = box.optout.blocking(self._states)
                if blockers:
                    # QEMU's x-pre-copy-dirty-page-tracking=off: the kernel keeps logging,
                    # we just do not ask until stop-and-copy. Until then the whole mapped
                    # range is reported dirty (status, predictor), without re-sending it.
                    why = ("pre-copy dirty tracking off for " + ", ".join(blockers)
                           + ": whole mapped range counted dirty until stop-and-copy")
                    skipped[box.name] = why
                    box.last = "skipped: " + why
                    assumed += sum(seg.size // self.page_size for seg in box.segments)
                    continue
                got, err = self._query(box)
                new += got
                if err is not None:
                    lost[box.name] = err
            dirty = self.bitmap.count() + assumed
            t1 = self._clock()
            if t1 > self._rate_t:       # a clock that did not move gives no rate sample
                self.rate.sample(new, t1)
                self._rate_t = t1
            self.syncs += 1
            self.last_sync = SyncResult(
                phase, dirty, dirty * self.page_size, new, new * self.page_size, t1 - t0,
                {b.name: b.chain.name for b in self._boxes if b.chain is not None},
                skipped, lost, assumed, assumed * self.page_size)
            return self.last_sync

    def _query(self, box: _Box) -> tuple[int, str | None]:
        """Report and merge every segment; on failure fall back or restart, then count
        the whole container dirty. Returns (pages reported, error or None)."""
        chain = box.chain
        assert chain is not None
        new = 0
        try:
            for seg in box.segments:
                new += self._merge(box, seg)
        except ProviderUnavailable as e:
            why = str(e)
            chain.fallback(str(e), box.ranges(), self.page_size)
        except KernelError as e:
            why = f"{chain.name} report failed, log treated as lost: {e}"
            chain.restart(why, box.ranges(), self.page_size)
        else:
            box.last = f"queried {chain.name}"
            return new, None
        self._resegment(box)
        box.last = why
        return self._mark_container(box), why

    def _merge(self, box: _Box, seg: _Segment) -> int:
        chain = box.chain
        assert chain is not None and chain.page_size is not None
        pg = chain.page_size
        nbits = seg.size // pg
        bits = chain.current.report(seg.iova, seg.size, box.scratch)
        if pg != self.page_size:
            bits = kernels.rescale(bits, pg, self.page_size, nbits)
            nbits = rescaled_nbits(nbits, pg, self.page_size)
        self.bitmap.merge_container(bits, seg.first_page, nbits)
        return kernels.popcount(bits, nbits)

    def _mark_container(self, box: _Box) -> int:
        n = 0
        for seg in box.segments:
            pages = seg.size // self.page_size
            self.bitmap.mark_all(PageRange(seg.first_page, pages))
            n += pages
        return n

    def _resegment(self, box: _Box) -> None:
        """Join mappings contiguous in IOVA and guest address; size the scratch bitmap."""
        segs: list[_Segment] = []
        for m in sorted(box.maps, key=lambda m: m.iova):
            s = segs[-1] if segs else None
            if s is not None and s.iova + s.size == m.iova and \
                    (s.first_page * self.page_size + s.size) == m.gpa:
                s.size += m.size
                s.maps.append(m)
            else:
                segs.append(_Segment(m.iova, m.size, m.gpa // self.page_size, [m]))
        box.segments = segs
        pg = box.chain.page_size if box.chain and box.chain.page_size else self.page_size
        need = max((-(-s.size // pg) + 63) // 64 for s in segs) if segs else 0
        if box.scratch is None or box.scratch.size < need:
            box.scratch = np.zeros(need, dtype=np.uint64)

    # -- mapping changes during tracking ------------------------------------------------
    def unmap(self, container: str, iova: int, size: int) -> int:
        """Unmap [iova, iova+size) of ``container`` (whole mappings only) and merge the
        final dirty bits of what was unmapped; returns the dirty guest pages merged."""
        with self._lock:
            box = self._box(container)
            end = iova + size
            gone = [m for m in box.maps if m.iova >= iova and m.iova + m.size <= end]
            cut = [m for m in box.maps if m.iova < end and m.iova + m.size > iova
                   and m not in gone]
            if cut or not gone:
                raise ValueError(f"dirty tracker unmap on {container}: [{iova:#x}, {end:#x}) "
                                 + (f"cuts through the mapping at {cut[0].iova:#x}"
                                    if cut else "holds no mapping"))
            chain = box.chain
            if not self.running or chain is None:
                box.spec.space.unmap(iova, size)
                return self._forget(box, gone)
            try:
                bits = chain.current.unmap(iova, size)
            except (ProviderUnavailable, KernelError) as e:
                still = all(box.spec.space.is_mapped(m.iova) for m in gone)
                if still and not isinstance(e, ProviderUnavailable):
                    raise                   # nothing changed and nothing lost: caller's call
                n = 0
                if not still:               # unmapped, final bits unknown: all count dirty
                    n = self._mark_maps(gone)
                    self._forget(box, gone)
                if isinstance(e, ProviderUnavailable):
                    chain.fallback(str(e), box.ranges(), self.page_size)
                else:                       # the provider's log may be lost (§7)
                    chain.restart(f"{chain.name} unmap failed: {e}", box.ranges(),
                                  self.page_size)
                self._resegment(box)
                self._mark_container(box)   # after the new START: nothing slips between
                return self.unmap(container, iova, size) if still else n
            return self._merge_unmapped(box, iova, bits, gone)

    def _merge_unmapped(self, box: _Box, iova: int, bits: Bitmap,
                        gone: list[DmaMapping]) -> int:
        chain = box.chain
        assert chain is not None and chain.page_size is not None
        pg = chain.page_size
        n = 0
        for m in gone:
            part = kernels.test_and_clear(bits, (m.iova - iova) // pg, m.size // pg)
            nbits = m.size // pg
            if pg != self.page_size:
                part = kernels.rescale(part, pg, self.page_size, nbits)
                nbits = rescaled_nbits(nbits, pg, self.page_size)
            self.bitmap.merge_container(part, m.gpa // self.page_size, nbits)
            n += kernels.popcount(part, nbits)
        self._forget(box, gone)
        return n

    def _mark_maps(self, maps: list[DmaMapping]) -> int:
        n = 0
        for m in maps:
            self.bitmap.mark_all(PageRange(m.gpa // self.page_size, m.size // self.page_size))
            n += m.size // self.page_size
        return n

    def _forget(self, box: _Box, gone: list[DmaMapping]) -> int:
        box.maps = [m for m in box.maps if m not in gone]
        self._resegment(box)
        return 0

    def add_mapping(self, container: str, mapping: DmaMapping) -> None:
        """Track a mapping the owner just created (MAP_DMA / IOAS_MAP). type1 and iommufd
        track it by themselves; device logging only logs the ranges given at START, so it
        is restarted with the new list and the container counts dirty once."""
        with self._lock:
            box = self._box(container)
            probe = TrackedContainer(box.spec.space, [*box.maps, mapping])
            box.maps = _check_mappings(probe, self.regions, self.page_size)
            chain = box.chain
            if self.running and chain is not None and chain.name == ProviderName.DEVICE_LOGGING:
                chain.restart(f"mapping at iova {mapping.iova:#x} added: device logging "
                              "restarted with the new ranges", box.ranges(), self.page_size)
                self._resegment(box)
                self._mark_container(box)
            else:
                self._resegment(box)

    # -- what to send -----------------------------------------------------------------
    def take_dirty_runs(self, max_run: int) -> tuple[np.ndarray, np.ndarray]:
        """Dirty pages as (first_page, count) int64 arrays (runs ≤ ``max_run`` pages),
        cleared from the bitmap in the same locked step (a concurrent merge cannot slip
        between reading and clearing)."""
        with self._lock:
            bits = self.bitmap.take_and_clear()
        return kernels.dirty_runs(bits, self.bitmap.npages, max_run)

    def dirty_rate(self) -> float | None:
        """Bytes per second dirtied over the latest interval between syncs."""
        return self.rate.last

    def provider(self, container: str) -> DirtyProvider | None:
        """The provider currently tracking ``container`` (None before ``start``)."""
        chain = self._box(container).chain
        return chain.current if chain is not None else None

    def _box(self, name: str) -> _Box:
        for b in self._boxes:
            if b.name == name:
                return b
        raise KeyError(f"dirty tracker: no container named {name!r}; have "
                       f"{[b.name for b in self._boxes]}")

    # -- status -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "running": self.running,
                "page_size": self.page_size,
                "guest_pages": self.bitmap.npages,
                "dirty_pages": self.bitmap.count(),
                "syncs": self.syncs,
                "dirty_rate_bytes_per_s": self.rate.last,
                "dirty_rate_smoothed_bytes_per_s": self.rate.smoothed,
                "containers": [self._box_status(b) for b in self._boxes],
            }

    def _box_status(self, b: _Box) -> dict[str, Any]:
        c = b.chain
        blockers = b.optout.blocking(self._states) if self.running else []
        return {
            "name": b.name,
            "tracker": c.name if c else None,
            "precise": c.current.precise if c else None,
            "page_size": c.page_size if c else None,
            "reason": c.current.reason if c else "not started",
            "running": bool(c and c.running),
            "mapped_bytes": sum(m.size for m in b.maps),
            "mappings": len(b.maps),
            "opt_out_devices": list(b.optout.devices),
            "opt_out_active": bool(blockers),
            "last_sync": b.last,
            "fallbacks": list(c.fallbacks) if c else [],
            "errors": list(c.errors) if c else [],
            "notes": list(c.notes) if c else [],
        }


def _aligned(what: str, page_size: int, **values: int) -> None:
    for k, v in values.items():
        if v < 0 or v % page_size:
            raise ValueError(f"dirty tracker: {what}: {k} {v:#x} is not a non-negative "
                             f"multiple of the {page_size:#x}-byte guest page")


def _check_regions(regions: Sequence[GuestRegion], page_size: int) -> list[GuestRegion]:
    out = sorted(regions, key=lambda r: r.gpa)
    for r in out:
        _aligned(f"region {r.name or hex(r.gpa)}", page_size, gpa=r.gpa, size=r.size)
        if r.size == 0:
            raise ValueError(f"dirty tracker: region {r.name or hex(r.gpa)} is empty")
    for a, b in zip(out, out[1:], strict=False):
        if b.gpa < a.gpa + a.size:
            raise ValueError(f"dirty tracker: regions at {a.gpa:#x} and {b.gpa:#x} overlap")
    return out


def _check_mappings(c: TrackedContainer, regions: list[GuestRegion],
                    page_size: int) -> list[DmaMapping]:
    name = c.space.name
    maps = sorted(c.mappings, key=lambda m: m.iova)
    for m in maps:
        what = f"mapping iova {m.iova:#x} on {name}"
        _aligned(what, page_size, iova=m.iova, size=m.size, gpa=m.gpa)
        if m.size == 0:
            raise ValueError(f"dirty tracker: {what} is empty")
        if not any(r.gpa <= m.gpa and m.gpa + m.size <= r.gpa + r.size for r in regions):
            raise ValueError(f"dirty tracker: {what} maps guest [{m.gpa:#x}, "
                             f"{m.gpa + m.size:#x}), which is not inside one RAM region")
    for a, b in zip(maps, maps[1:], strict=False):
        if b.iova < a.iova + a.size:
            raise ValueError(f"dirty tracker: mappings at iova {a.iova:#x} and {b.iova:#x} "
                             f"on {name} overlap")
    return maps
