"""The per-guest dirty tracker: every container's provider merged into one bitmap over
guest-physical pages (docs/architecture.md §3, §4; docs/kernel-contract.md §3.8, §3.9, §4.4, §7).

A guest is a set of RAM regions (guest-physical address, size) and one or more DMA
spaces (containers), each mapping IOVA ranges onto guest memory (``tracker_layout``).
``start`` chooses and starts each container's provider; ``sync`` pulls each container's
bitmap through it and OR-merges it into the guest's ``GlobalBitmap``
(``container_tracking``); the RAM sender takes what is dirty with ``take_dirty_runs``.
``unmap``/``add_mapping`` keep tracking right while mappings change (``tracker_mappings``);
``status`` is a typed snapshot (``tracker_status``).

No dirty bit is lost:
* unmapping a range while tracking merges its final bits before the mapping leaves;
* a provider that turns out unavailable is replaced by the next one in its chain, and
  after any REPORT failure the whole container counts as dirty for that sync;
* the pre-copy opt-out (``optout.py``) skips the query; ``SyncResult.dirty_pages`` then
  counts the container's whole mapped range (``assumed_dirty_pages``) so the predictor and
  status never treat it as clean, but those pages are not put in the bitmap, so pre-copy
  does not re-send them every pass. The kernel keeps logging meanwhile, and the first
  sync after the opted-out devices stopped (stop-and-copy) collects all of it.

One lock serialises every change of the bitmap and the containers, so a merge cannot slip
between taking the dirty runs and clearing them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from vfiod.dirty.container_tracking import ContainerTracking, ScratchBitmap
from vfiod.dirty.global_bitmap import DirtyRate, GlobalBitmap
from vfiod.dirty.optout import StateSource, state_lookup
from vfiod.dirty.providers.base import DirtyProvider
from vfiod.dirty.ranges import PageRange
from vfiod.dirty.tracker_layout import (
    RamRegion,
    TrackedContainer,
    check_mappings,
    check_regions,
)
from vfiod.dirty.tracker_mappings import add_tracked_mapping, unmap_tracked
from vfiod.dirty.tracker_status import SyncResult, TrackerStatus, container_status
from vfiod.errors import KernelError
from vfiod.vfio.container import DmaMapping


class DirtyTracker:
    def __init__(self, regions: Sequence[RamRegion], containers: Sequence[TrackedContainer],
                 page_size: int = 4096, device_states: StateSource | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if page_size < 4096 or page_size & (page_size - 1):
            raise ValueError(f"dirty tracker: guest page size {page_size:#x} must be a "
                             "power of two >= 4096")
        self.page_size = page_size
        self.regions = check_regions(regions, page_size)
        self._states = state_lookup(device_states)
        self._clock = clock
        names = [c.space.name for c in containers]
        if len(set(names)) != len(names):
            raise ValueError(f"dirty tracker: container names must be unique, got {names}")
        end = max((r.gpa + r.size for r in self.regions), default=0)
        self.bitmap = GlobalBitmap(end // page_size, page_size)
        self._scratch = ScratchBitmap()
        self._boxes = [ContainerTracking(c, check_mappings(c, self.regions, page_size),
                                         self.bitmap, page_size, self._scratch)
                       for c in containers]
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
                    box.start()
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
        first STOP failure after all were tried. The scratch buffer is given back, and
        the bitmap's words when no page is left dirty (``release_if_clear``): a source
        kept both, 1.0 to 2.0 bitmaps of its guest, from its migration on (docs/benchmarks.md
        §2, "RSS per guest")."""
        with self._lock:
            self.running = False
            first = self._stop_all()
            self._scratch.release()
            self.bitmap.release_if_clear()
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
            assumed = optout_new = optout_mapped = 0
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
                    assumed += box.mapped_pages()
                    continue
                got, err = box.query()
                new += got
                if box.optout.devices:
                    optout_new += got
                    optout_mapped += box.mapped_pages()
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
                skipped, lost, assumed, assumed * self.page_size, optout_new, optout_mapped)
            return self.last_sync

    # -- mapping changes during tracking ------------------------------------------------
    def unmap(self, container: str, iova: int, size: int) -> int:
        """Unmap [iova, iova+size) of ``container`` (whole mappings only) and merge the
        final dirty bits of what was unmapped; returns the dirty guest pages merged."""
        with self._lock:
            return unmap_tracked(self._box(container), iova, size, running=self.running)

    def add_mapping(self, container: str, mapping: DmaMapping) -> None:
        """Track a mapping the owner just created (MAP_DMA / IOAS_MAP)."""
        with self._lock:
            add_tracked_mapping(self._box(container), mapping, self.regions,
                                running=self.running)

    # -- what to send -----------------------------------------------------------------
    def take_dirty_runs(self, max_run: int) -> tuple[np.ndarray, np.ndarray]:
        """Dirty pages as (first_page, count) int64 arrays (runs ≤ ``max_run`` pages),
        cleared from the bitmap in the same locked step (a concurrent merge cannot slip
        between reading and clearing). The runs are read from the bitmap itself, not from
        a copy of it: a copy was one more bitmap's worth of memory for as long as a pass
        was being sent."""
        with self._lock:
            return self.bitmap.take_runs(max_run)

    @property
    def scratch_bytes(self) -> int:
        """Memory held for dirty reports on top of the guest's bitmap (one buffer for the
        largest segment of any container)."""
        return self._scratch.words.nbytes

    def dirty_rate(self) -> float | None:
        """Bytes per second dirtied over the latest interval between syncs."""
        return self.rate.last

    def opted_out_runs(self) -> list[tuple[int, int]]:
        """(first guest page, pages) of every segment of a container with opted-out
        devices: what pre-copy counts dirty without asking (the source samples it)."""
        with self._lock:
            return [(seg.first_page, seg.size // self.page_size)
                    for b in self._boxes if b.optout.devices for seg in b.segments]

    def provider(self, container: str) -> DirtyProvider | None:
        """The provider currently tracking ``container`` (None before ``start``)."""
        chain = self._box(container).chain
        return chain.current if chain is not None else None

    def _box(self, name: str) -> ContainerTracking:
        for b in self._boxes:
            if b.name == name:
                return b
        raise KeyError(f"dirty tracker: no container named {name!r}; have "
                       f"{[b.name for b in self._boxes]}")

    # -- status -----------------------------------------------------------------------
    def status(self) -> TrackerStatus:
        with self._lock:
            return TrackerStatus(
                running=self.running, page_size=self.page_size,
                guest_pages=self.bitmap.npages, dirty_pages=self.bitmap.count(),
                syncs=self.syncs, dirty_rate_bytes_per_s=self.rate.last,
                dirty_rate_smoothed_bytes_per_s=self.rate.smoothed,
                containers=tuple(
                    container_status(b, b.optout.blocking(self._states) if self.running
                                     else []) for b in self._boxes))
