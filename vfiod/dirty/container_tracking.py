"""One container's dirty tracking while it runs (docs/architecture.md §3; docs/kernel-contract.md §3.9, §4.4, §7):
the provider chosen for it at start, its mappings joined into segments, and the query
that merges its dirty bits into the guest's ``GlobalBitmap``.

Mappings contiguous in both IOVA and guest address are queried as one segment (one ioctl
and one merge, at the segment's guest page, which need not be a multiple of 64), with a
scratch bitmap reused across syncs; bits are rescaled when the IOMMU page differs from
the guest page. A type1 report whose segment starts on a word of the guest's bitmap
goes straight into that bitmap (``GlobalBitmap.merge_report``, ``report_in_place``); the
others, and one the bitmap's words decline, go through a scratch bitmap, one per guest
(``ScratchBitmap``), shared by its containers: they are queried one at a time under the
tracker's lock, so one buffer sized for the largest segment does. It is allocated zeroed
(calloc: no resident memory until a report is written into it).

A provider that turns out unavailable (EOPNOTSUPP/ENOTTY) is replaced by the next one in
its chain; after any REPORT failure the whole container counts dirty for that sync (the
log may be lost), marked after the replacement started so that no write slips between.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from vfiod.dirty import bitmap_kernels as kernels
from vfiod.dirty.bitmap_args import rescaled_nbits
from vfiod.dirty.global_bitmap import GlobalBitmap
from vfiod.dirty.optout import OptOut
from vfiod.dirty.providers.base import Bitmap, IovaRange, ProviderName, ProviderUnavailable
from vfiod.dirty.providers.chain import ProviderChain
from vfiod.dirty.providers.select import select
from vfiod.dirty.ranges import PageRange
from vfiod.dirty.tracker_layout import TrackedContainer
from vfiod.errors import KernelError
from vfiod.vfio.container import DmaMapping


@dataclass
class _Segment:
    iova: int
    size: int
    first_page: int             # guest page of iova
    maps: list[DmaMapping]


class ScratchBitmap:
    """The buffer dirty reports are written into before their merge, grown on demand."""

    def __init__(self) -> None:
        self.words: Bitmap = np.zeros(0, dtype=np.uint64)

    def fit(self, nwords: int) -> None:
        if self.words.size < nwords:
            self.words = np.zeros(nwords, dtype=np.uint64)

    def release(self) -> None:
        """Give the buffer back (tracking stopped); the next ``fit`` allocates again."""
        self.words = np.zeros(0, dtype=np.uint64)


class ContainerTracking:
    """Run-time state of one container: its mappings, provider chain and segments."""

    def __init__(self, spec: TrackedContainer, maps: list[DmaMapping], bitmap: GlobalBitmap,
                 page_size: int, scratch: ScratchBitmap) -> None:
        self.spec = spec
        self.name = spec.space.name
        self.maps = maps
        self.optout = OptOut.from_config([d.name for d in spec.space.devices],
                                         spec.pre_copy_dirty_page_tracking)
        self.chain: ProviderChain | None = None
        self.segments: list[_Segment] = []
        self.scratch = scratch          # the guest's, shared by all its containers
        #: what the latest sync did with this container, for status
        self.last: str = "not synced"
        self.bitmap = bitmap            # the guest's, shared by all its containers
        self.page_size = page_size      # the guest page

    def ranges(self) -> list[IovaRange]:
        return [(m.iova, m.size) for m in self.maps]

    def running_chain(self) -> ProviderChain:
        assert self.chain is not None, f"{self.name}: tracking not started"
        return self.chain

    def start(self) -> None:
        """Choose the provider (first of the chain that starts) and segment the mappings."""
        disable = set(self.spec.disable)
        if not self.maps:               # device logging needs ranges at START (§7)
            disable.add(ProviderName.DEVICE_LOGGING)
        self.chain = ProviderChain(select(self.spec.space, disable), self.name)
        self.chain.start(self.ranges(), self.page_size)
        self.resegment()

    def mapped_pages(self) -> int:
        return sum(seg.size // self.page_size for seg in self.segments)

    # -- query ------------------------------------------------------------------------
    def query(self) -> tuple[int, str | None]:
        """Report and merge every segment; on failure fall back or restart, then count
        the whole container dirty. Returns (pages reported, error or None)."""
        chain = self.running_chain()
        new = 0
        try:
            for seg in self.segments:
                new += self._merge(seg)
        except (ProviderUnavailable, KernelError) as e:
            why = self.recover(e, f"{chain.name} report failed, log treated as lost: {e}")
        else:
            self.last = f"queried {chain.name}"
            return new, None
        self.last = why
        return self.mark_all(), why

    def _merge(self, seg: _Segment) -> int:
        chain = self.running_chain()
        assert chain.page_size is not None
        pg = chain.page_size
        nbits = seg.size // pg
        provider = chain.current
        if (pg == self.page_size and seg.first_page % 64 == 0
                and getattr(provider, "report_overwrites", False)):
            got = self.bitmap.merge_report(
                lambda words: provider.report(seg.iova, seg.size, words), seg.first_page,
                nbits)
            if got is not None:
                return got
        bits = provider.report(seg.iova, seg.size, self.scratch.words)
        if pg != self.page_size:
            bits = kernels.rescale(bits, pg, self.page_size, nbits)
            nbits = rescaled_nbits(nbits, pg, self.page_size)
        return self.bitmap.merge_and_count(bits, seg.first_page, nbits)

    def recover(self, e: ProviderUnavailable | KernelError, restart_why: str) -> str:
        """After a provider failed: the next provider if it is unavailable, else a restart
        of the same one (its log may be lost); returns why."""
        chain = self.running_chain()
        if isinstance(e, ProviderUnavailable):
            why = str(e)
            chain.fallback(why, self.ranges(), self.page_size)
        else:
            why = restart_why
            chain.restart(why, self.ranges(), self.page_size)
        self.resegment()
        return why

    # -- marking and layout -------------------------------------------------------------
    def mark_all(self) -> int:
        """Mark every mapped page dirty; returns how many."""
        ps = self.page_size
        return self._mark((s.first_page, s.size // ps) for s in self.segments)

    def mark_maps(self, maps: list[DmaMapping]) -> int:
        ps = self.page_size
        return self._mark((m.gpa // ps, m.size // ps) for m in maps)

    def _mark(self, runs: Iterable[tuple[int, int]]) -> int:
        n = 0
        for first, pages in runs:
            self.bitmap.mark_all(PageRange(first, pages))
            n += pages
        return n

    def forget(self, gone: list[DmaMapping]) -> None:
        self.maps = [m for m in self.maps if m not in gone]
        self.resegment()

    def resegment(self) -> None:
        """Join mappings contiguous in IOVA and guest address; size the scratch bitmap."""
        ps = self.page_size
        segs: list[_Segment] = []
        for m in sorted(self.maps, key=lambda m: m.iova):
            s = segs[-1] if segs else None
            if s is not None and s.iova + s.size == m.iova and \
                    (s.first_page * ps + s.size) == m.gpa:
                s.size += m.size
                s.maps.append(m)
            else:
                segs.append(_Segment(m.iova, m.size, m.gpa // ps, [m]))
        self.segments = segs
        pg = self.chain.page_size if self.chain and self.chain.page_size else ps
        need = max((-(-s.size // pg) + 63) // 64 for s in segs) if segs else 0
        self.scratch.fit(need)
