"""Our own DMA test device on a real kernel (native/vfiod_dma/README.md): the dirty bits
vfiod reads are exactly the pages the device wrote.

A type1 container holding only vfiod_dma mdevs is in pinned-page scope
(docs/kernel-contract.md §3.9): type1 reports the pages written through vfio_dma_rw() and
the pages pinned since the last GET, and the device unpins after every write. vfiod's
``DirtyTracker`` reads type1 and merges into the guest bitmap (mappings at unaligned guest
pages 37 and 160); after each random set of writes, pages and unaligned byte ranges,
through both DMA paths, the bitmap holds those pages, no more and no fewer; with the
device's pre-copy tracking opted out, they arrive at the first sync after it stops. The
background writer's pages and bytes are checked the same way. Migration of the device is
tests/kernel/guest/test_native_dma_migration.py.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from tests.kernel.guest import rig
from tests.kernel.guest.conftest import Opened, open_device
from tests.kernel.guest.native_dma import MAX_RANGES, DmaControl
from tests.support.daemons import wait_until
from vfiod.abi import vfio as v
from vfiod.dirty.providers import DmaSpace, select
from vfiod.dirty.tracker import DirtyTracker, TrackedContainer
from vfiod.kernel.linux import LinuxKernel
from vfiod.migration.guest import RamBlock
from vfiod.migration.states import MigState
from vfiod.vfio import DmaMapping, HostPaths, RamRegion

PAGE = 4096
RAM_PAGES = 256
IOVA = 0x10_0000_0000
#: (guest page, pages, iova) of the two mappings: apart in IOVA, unaligned in the guest
LAYOUT = ((37, 100, IOVA), (160, 50, IOVA + 0x1000_0000))
ROUNDS = 24


@pytest.fixture
def dma_dev(kernel: LinuxKernel, paths: HostPaths,
            native_dma_pair: tuple[str, str]) -> Iterator[Opened]:
    o = open_device(kernel, paths, native_dma_pair[0])
    yield o
    o.container.close()


@dataclass
class Tracked:
    ram: RamBlock
    maps: list[DmaMapping]
    tracker: DirtyTracker
    control: DmaControl


def track(kernel: LinuxKernel, o: Opened, opt_out: bool) -> Iterator[Tracked]:
    """Guest RAM mapped as LAYOUT says, tracked by vfiod's DirtyTracker from a clean
    bitmap (``opt_out``: the device has pre-copy dirty tracking off, and the tracker reads
    its state from the kernel); unmapped and stopped afterwards."""
    c = o.container
    name = o.device.name
    with rig.guest_ram(kernel, RAM_PAGES * PAGE) as ram:
        maps = []
        for gpa_page, npages, iova in LAYOUT:
            c.map_dma(iova, ram.addr + gpa_page * PAGE, npages * PAGE)
            maps.append(DmaMapping(iova, npages * PAGE, gpa_page * PAGE))
        space = DmaSpace("dma", [o.device], type1=c)
        t = DirtyTracker([RamRegion("ram", 0, RAM_PAGES * PAGE)],
                         [TrackedContainer(space, maps, {name: not opt_out})], PAGE,
                         device_states=lambda _: o.device.get_mig_state())
        t.start(initial_all_dirty=False)
        try:
            yield Tracked(ram, maps, t, DmaControl(name))
        finally:
            t.stop()
            for m in list(c.mappings):
                c.unmap_dma(m.iova, m.size)


@pytest.fixture
def tracked(kernel: LinuxKernel, dma_dev: Opened, numba_cache: None) -> Iterator[Tracked]:
    yield from track(kernel, dma_dev, opt_out=False)


@pytest.fixture
def tracked_opted_out(kernel: LinuxKernel, dma_dev: Opened,
                      numba_cache: None) -> Iterator[Tracked]:
    yield from track(kernel, dma_dev, opt_out=True)


def dirty_pages(t: DirtyTracker) -> set[int]:
    first, count = t.take_dirty_runs(1 << 20)
    return {p for f, n in zip(first, count, strict=True) for p in range(int(f), int(f + n))}


def random_ranges(rng: random.Random, maps: list[DmaMapping]) -> list[tuple[int, int]]:
    """A few whole pages and byte ranges at any offset (some crossing pages), inside one
    mapping each."""
    out = []
    for _ in range(rng.randint(1, 12)):
        m = rng.choice(maps)
        if rng.random() < 0.5:
            start = rng.randrange(m.size // PAGE) * PAGE
            length = PAGE
        else:
            start = rng.randrange(m.size - 1)
            length = rng.randint(1, min(3 * PAGE, m.size - start))
        out.append((m.iova + start, length))
    return out


def guest_pages(ranges: list[tuple[int, int]], maps: list[DmaMapping]) -> set[int]:
    pages = set()
    for iova, length in ranges:
        m = next(m for m in maps if m.iova <= iova < m.iova + m.size)
        gpa = m.gpa + iova - m.iova
        pages.update(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))
    return pages


def test_native_dma_is_a_precise_type1_device(dma_dev: Opened) -> None:
    dev = dma_dev.device
    assert dev.mig_flags() == (v.VFIO_MIGRATION_STOP_COPY | v.VFIO_MIGRATION_P2P
                               | v.VFIO_MIGRATION_PRE_COPY)
    assert not dev.dma_logging_probe()
    sel = select(DmaSpace("dma", [dev], type1=dma_dev.container))
    assert [p.name for p in sel.chain] == ["type1", "none"]
    assert sel.chain[0].precise, "an mdev-only container is in pinned-page scope"


def test_native_dma_dirty_bits_are_exactly_the_written_pages(tracked: Tracked) -> None:
    t, ctl = tracked.tracker, tracked.control
    assert t.sync().new_dirty_pages == 0
    rng = random.Random(0x5EED)
    before = ctl.dma_stats()
    pinned = written = 0
    for round_no in range(ROUNDS):
        ranges = random_ranges(rng, tracked.maps)
        mode = "pin" if round_no % 2 else "rw"
        pattern = 0x10 + round_no
        ctl.dma_write(ranges, pattern, mode)
        want = guest_pages(ranges, tracked.maps)
        r = t.sync()
        got = dirty_pages(t)
        assert got == want, (round_no, mode, ranges, sorted(got ^ want))
        assert (r.providers, r.lost, r.new_dirty_pages) == ({"dma": "type1"}, {}, len(want))
        # what the device wrote is in guest memory, where the guest expects it
        mem = np.frombuffer(tracked.ram.mem, dtype=np.uint8)
        last = ranges[-1]
        gpa = next(m.gpa + last[0] - m.iova for m in tracked.maps
                   if m.iova <= last[0] < m.iova + m.size)
        assert (mem[gpa:gpa + last[1]] == pattern).all()
        written += sum(length for _, length in ranges)
        if mode == "pin":       # every range pins each page it touches, once
            pinned += sum(len(guest_pages([rg], tracked.maps)) for rg in ranges)
        # unpinned after the write: the next GET reports nothing again
        assert t.sync().new_dirty_pages == 0
        assert not dirty_pages(t)
    after = ctl.dma_stats()
    assert after["commands"] - before["commands"] == ROUNDS
    assert after["bytes"] - before["bytes"] == written
    assert after["pinned"] - before["pinned"] == pinned > 0


def test_native_dma_refuses_bad_commands_and_a_stopped_device(tracked: Tracked) -> None:
    ctl = tracked.control
    m = tracked.maps[0]
    for bad in ("rw 0x1", "zap 0x1 0x10:1", f"rw 0x100 {m.iova:#x}:0",
                "rw 0x1 " + " ".join(f"{m.iova:#x}:1" for _ in range(MAX_RANGES + 1))):
        with pytest.raises(OSError) as ei:
            (ctl.dir / "dma_write").write_text(bad)
        assert ei.value.errno == errno.EINVAL, bad
    # outside every mapping: type1 finds no vfio_dma
    with pytest.raises(OSError) as ei:
        ctl.dma_write([(IOVA - PAGE, 1)], 0xAA)
    assert ei.value.errno == errno.EINVAL
    # nothing was written, so nothing is dirty
    assert tracked.tracker.sync().new_dirty_pages == 0
    assert not dirty_pages(tracked.tracker)


def writer_bytes(pattern: int, written: int, pages: int) -> list[int]:
    """The byte each of the writer's ``pages`` holds after ``written`` page writes."""
    return [(pattern + (written - 1 - i) // pages) & 0xFF for i in range(pages)]


def test_native_dma_writer_dirties_what_it_wrote_and_stops_when_unmapped(
        tracked: Tracked) -> None:
    t, ctl = tracked.tracker, tracked.control
    m = tracked.maps[1]                                  # guest pages 160..209
    assert t.sync().new_dirty_pages == 0
    ctl.start_writer(rate=400, pattern=0x30, iova=m.iova + 10 * PAGE, pages=8)
    wait_until(lambda: ctl.writer()["written"] >= 20, 30, "the writer to write 20 pages")
    ctl.stop_writer()
    st = ctl.writer()
    assert (st["rate"], st["error"]) == (0, 0)
    t.sync()
    assert dirty_pages(t) == set(range(170, 178))       # those 8 pages, nothing else
    mem = np.frombuffer(tracked.ram.mem, dtype=np.uint8)
    got = [int(mem[(170 + i) * PAGE]) for i in range(8)]
    assert got == writer_bytes(0x30, st["written"], 8)
    assert t.sync().new_dirty_pages == 0                # stopped means stopped

    # unmapping the range under a running writer stops it with the kernel's EINVAL
    ctl.start_writer(rate=400, pattern=0x50, iova=m.iova, pages=4)
    wait_until(lambda: ctl.writer()["written"] >= 1, 30, "the writer to start")
    assert t.unmap("dma", m.iova, m.size) >= 1
    st = wait_until(lambda: (w := ctl.writer())["rate"] == 0 and w, 30,
                    "the writer to stop by itself")
    assert st["error"] == -errno.EINVAL


def test_native_dma_opted_out_pages_arrive_in_stop_and_copy(tracked_opted_out: Tracked,
                                                            dma_dev: Opened) -> None:
    """QEMU's x-pre-copy-dirty-page-tracking=off: while the device runs, its container is
    not queried and counts all dirty; the first sync after it stops collects exactly
    what it wrote meanwhile (docs/architecture.md §3)."""
    t, ctl = tracked_opted_out.tracker, tracked_opted_out.control
    mapped = sum(m.size for m in tracked_opted_out.maps) // PAGE
    ranges = random_ranges(random.Random(0x0F7), tracked_opted_out.maps)
    ctl.dma_write(ranges, 0x66)
    r = t.sync()
    assert "dma" in r.skipped and r.assumed_dirty_pages == mapped
    assert not dirty_pages(t), "queried while an opted-out device runs"
    dma_dev.device.set_mig_state(MigState.STOP)
    try:
        r = t.sync("stopcopy")
        assert (r.skipped, r.assumed_dirty_pages) == ({}, 0)
        assert dirty_pages(t) == guest_pages(ranges, tracked_opted_out.maps)
    finally:
        dma_dev.device.set_mig_state(MigState.RUNNING)
