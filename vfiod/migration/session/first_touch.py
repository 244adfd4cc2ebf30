"""What landing a page its memory never held costs the destination (docs/architecture.md
§4 "fixed costs measured on this path"; docs/kernel-contract.md §3.7; docs/protocol.md
§8.2, ACK ``hello``).

A page of guest RAM the destination's process never touched is not there yet: the first
write to it faults, and the kernel allocates and zeroes a page (3-7 µs on the project's
machine). A final pass of pages the source never sent before, a sparse guest's scattered
writes, lands on such pages, one fault each, after its record arrived (a RAM_RUNS record is
received whole, then copied out, docs/protocol.md §5.4), so the commit waits for them. A
container holding an IOMMU-backed group pins, and so faults in, all of its mapped RAM at
MAP_DMA: those pages are resident and cost nothing more.

The destination measures the price before its HELLO (``measure_first_touch_s``): a fault's
time on a scratch memory file (``SCRATCH_PAGES`` pages 2 MiB apart, written once, then
again; the difference of the two rounds' typical writes), times the share of
``SAMPLE_PAGES`` pages spread over its landing memory that ``mincore`` finds not resident.
Reading guest memory would fault pages in; a residency query changes nothing, so a VMM's
memory is safe. The HELLO carries the price (``first_touch_s``); the source checks it
(``first_touch_from_hello``), counts the final pass's pages it never sent (their CRC is
still a zero page's, ``RamDigests.never_landed``), and predicts their landing
(``first_touch_landing_s``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from vfiod.errors import ProtocolError
from vfiod.kernel.ops import KernelOps
from vfiod.migration.guest.memory import RamBlock
from vfiod.migration.session.phases import PredictionNumbers
from vfiod.migration.stream.ram_framing import BATCH_PIECES, TAIL_PAGES

SCRATCH_PAGES = 64
#: the scratch pages' spacing: what one page table maps on x86-64, so that each page also
#: needs a page table of its own, as a sparse guest's scattered pages do (5-8 µs a page
#: here, against 3-4 µs for neighbouring pages)
SCRATCH_STRIDE = 2 << 20
SAMPLE_PAGES = 64
#: a fault takes microseconds: a price above this is a broken clock or a hostile peer
FIRST_TOUCH_MAX_S = 1e-3


def fault_s(kernel: KernelOps, pages: int = SCRATCH_PAGES, stride: int = SCRATCH_STRIDE,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds a write to a page never touched costs beyond one to a resident page: one
    page every ``stride`` bytes of a fresh memory file, ``pages`` of them, written once,
    then again (the file stays sparse: only those pages are allocated); each write is
    timed alone, and of each round the typical write counts (``_typical``)."""
    fd = kernel.memfd_create("vfiod-first-touch", pages * stride)
    try:
        mem = kernel.mmap(fd, pages * stride)
    finally:
        kernel.close(fd)
    took = np.empty((2, pages))
    try:
        view = np.frombuffer(mem, dtype=np.uint8)
        for r in range(2):              # the first round faults every page in
            for p in range(pages):
                t0 = clock()
                view[p * stride] = 1
                took[r, p] = clock() - t0
        del view                        # the mapping cannot close while viewed
    finally:
        mem.close()
    return max(0.0, _typical(took[0]) - _typical(took[1]))


def _typical(took: np.ndarray) -> float:
    """The mean write, leaving out those the scheduler held up (ten times the median or
    more: a preemption takes milliseconds, a slow fault a few times a quick one's, and
    the faults a pass pays add up as their mean does)."""
    med = float(np.median(took))
    return float(took[took < 10 * med].mean()) if med > 0 else 0.0


def not_resident_share(kernel: KernelOps, blocks: Sequence[RamBlock], page_size: int,
                       samples: int = SAMPLE_PAGES) -> float:
    """The share of ``samples`` pages, spread evenly over ``blocks``, that are not
    resident (``KernelOps.mincore``; nothing is read or faulted in)."""
    total = sum(b.region.size for b in blocks)
    if total <= 0 or samples <= 0:
        return 0.0
    absent = 0
    for i in range(samples):
        at = int((i + 0.5) * total / samples) // page_size * page_size
        for b in blocks:
            if at < b.region.size:
                absent += not kernel.mincore(b.addr + at, page_size)[0] & 1
                break
            at -= b.region.size
    return absent / samples


def measure_first_touch_s(kernel: KernelOps, blocks: Sequence[RamBlock], page_size: int
                          ) -> float:
    """Seconds landing a page costs where the destination's memory never held it, on
    average over its landing memory ``blocks`` (0 where all of it is resident)."""
    share = not_resident_share(kernel, blocks, page_size)
    return min(FIRST_TOUCH_MAX_S, share * fault_s(kernel)) if share else 0.0


def first_touch_from_hello(fields: Mapping[str, Any]) -> float:
    """The destination's ``first_touch_s`` (0 from a destination that does not send it);
    ``ProtocolError`` naming it when it is not seconds from 0 to ``FIRST_TOUCH_MAX_S``."""
    v = fields.get("first_touch_s")
    if v is None:
        return 0.0
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= FIRST_TOUCH_MAX_S:
        raise ProtocolError(f"the destination's hello has first_touch_s {v!r}: it must be "
                            f"seconds per page, from 0 to {FIRST_TOUCH_MAX_S:g}")
    return float(v)


def first_touch_landing_s(num: PredictionNumbers, first_touch_s: float,
                          bandwidth_bps: float, record_bytes: int, page_size: int) -> float:
    """The destination's time landing the final pass's pages its memory never held,
    beyond the pass's bytes: the commit waits for it. A record is landed once all of it
    arrived, one record after the other, while the source sends the next ones: the
    destination ends the later of the pass's last record (``TAIL_PAGES`` at most,
    ``ram_framing.tapered``) landed after it arrived, and all the landing after the
    first record arrived. The faults are taken as spread over the pass's bytes; its
    first record is a record's bytes, or a send batch's pieces (``BATCH_PIECES``) of
    its mean run. A few hundred scattered pages are one record and a short tail: nearly
    all of it shows; on a slow link, or in a pass of many records, only the tail's."""
    landing_s, total = num.first_touch_pages * first_touch_s, num.dirty_ram_bytes
    if landing_s <= 0 or total <= 0:
        return 0.0
    tail = min(total, TAIL_PAGES * page_size)
    first = min(total - tail, record_bytes, BATCH_PIECES * total / max(1, num.dirty_runs))
    return max(landing_s * tail / total,
               landing_s - (total - first) / max(1.0, bandwidth_bps))
