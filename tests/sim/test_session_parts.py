"""The parts the sessions are built from, each on its own: content digests, the cost
model, the bandwidth cap, status formatting, the guest model's checks, the simulated
workload (deterministic, pausable) and the zero-page scan. Bad input shows its error."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.session_rig import (
    MiB,
    Side,
    SideContainer,
    build_side,
    spec,
)
from vfiod.dirty.tracker_status import ContainerStatus, TrackerStatus
from vfiod.errors import KernelError
from vfiod.kernel.sim.workload import DmaTarget, Workload, WorkloadConfig, fill
from vfiod.migration.guest import Guest, GuestPlan, build_guest
from vfiod.migration.planning.predictor import BandwidthEstimator
from vfiod.migration.session.common import SessionConfig
from vfiod.migration.session.costs import RECORD_PRIOR_S, CostModel, records_for
from vfiod.migration.session.digest import RamDigests, RegionDigest, compare_roots
from vfiod.migration.session.link import ThrottledLink
from vfiod.migration.session.phases import PIECE_PRIOR_S, RamSender
from vfiod.migration.session.ram_files import (
    PieceBuffer,
    full_ram_digest,
    nonzero_page_runs,
    zero_ram,
)
from vfiod.migration.session.status import (
    IterationProgress,
    device_column,
    format_progress_line,
    tracker_view,
    triple,
)
from vfiod.migration.states import GuestState, MigrationState, MigState
from vfiod.migration.stream.header import StreamHeader
from vfiod.migration.stream.writer import StreamWriter
from vfiod.vfio import RamRegion

PS = 4096


@pytest.fixture
def side(tmp_path: Path):
    s = build_side(tmp_path, "h", [SideContainer([spec("v2_precopy_log")])],
                   fill_bytes=1 * MiB)
    yield s
    s.close()


# -- content digests -------------------------------------------------------------------
def digests(s: Side) -> RamDigests:
    g = s.guest
    return RamDigests(g.ram_regions(), [b.view() for b in g.ram], g.page_size)


def test_incremental_digest_equals_full_digest(side: Side) -> None:
    d = digests(side)
    npages = side.guest.ram[0].size // PS
    d.touch(np.arange(0, npages, 3, dtype=np.int64), np.full(len(range(0, npages, 3)), 3))
    assert d.pending_pages == npages
    assert d.rehash() == npages
    full = full_ram_digest(side.kernel, side.guest.ram)
    assert d.roots() == full
    assert compare_roots(full, d.roots()) == []


def test_digest_sees_one_changed_byte_only_after_touch(side: Side) -> None:
    d = digests(side)
    d.touch_range(0, side.guest.ram[0].size // PS)
    d.rehash()
    before = d.roots()
    with side.guest.ram[0].view() as mem:
        mem[5 * PS + 7] ^= 0xFF
    assert d.roots() == before                 # not touched: not re-hashed
    d.touch_range(5, 1)
    assert d.rehash() == 1
    diff = compare_roots(before, d.roots())
    assert len(diff) == 1 and "RAM region ram: source content digest" in diff[0]


def test_touch_scalar_and_vector_agree(side: Side) -> None:
    a, b = digests(side), digests(side)
    rng = np.random.default_rng(3)
    first = rng.integers(0, 2000, 400)
    count = rng.integers(1, 40, 400)
    a.touch(first, count)                      # > 256 runs: the vectorised path
    for f, n in zip(first.tolist(), count.tolist(), strict=True):
        b.touch_range(f, n)
    assert a.pending_pages == b.pending_pages
    a.rehash(), b.rehash()
    assert a.roots() == b.roots()


def test_digest_bad_input() -> None:
    r1, r2 = RamRegion("a", 8 * PS, PS), RamRegion("b", 0, PS)
    with pytest.raises(ValueError, match="guest-address order"):
        RamDigests((r1, r2), [bytearray(PS), bytearray(PS)], PS)
    with pytest.raises(ValueError, match="1 regions but 2 views"):
        RamDigests((r1,), [bytearray(PS), bytearray(PS)], PS)
    with pytest.raises(ValueError, match="needs name, pages, digest"):
        RegionDigest.from_dict({"name": "x"})
    assert "no destination digest" in compare_roots([RegionDigest("a", 1, "x")], [])[1]


def test_nonzero_page_runs(side: Side) -> None:
    b = side.guest.ram[0]
    with b.view() as mem:
        mem[:] = bytes(len(mem))
        for p in (0, 1, 2, 10, 2047):
            mem[p * PS + 100] = 1
    assert nonzero_page_runs(side.kernel, b.fd, 0, 0, 2048, PS) == [(0, 3), (10, 1),
                                                                     (2047, 1)]
    assert nonzero_page_runs(side.kernel, b.fd, 9 * PS, 9, 3, PS) == [(10, 1)]
    # through a caller's buffer smaller than the range: read piece by piece, runs joined
    # across pieces, the same answer
    with PieceBuffer(side.kernel, 4 * PS) as buf:
        assert nonzero_page_runs(side.kernel, b.fd, 0, 0, 2048, PS, buf) == [
            (0, 3), (10, 1), (2047, 1)]


def test_piece_buffer_reads_in_place_and_refuses_what_does_not_fit(side: Side) -> None:
    b = side.guest.ram[0]
    with b.view() as mem:
        mem[PS:PS + 5] = b"piece"
    buf = PieceBuffer(side.kernel, 2 * PS)
    first = buf.read(b.fd, 2 * PS, 0, "ram")
    assert bytes(first[PS:PS + 5]) == b"piece"
    assert bytes(buf.read(b.fd, 5, PS, "ram")) == b"piece"
    with pytest.raises(ValueError, match="ram: a 12288-byte read into a 8192-byte buffer"):
        buf.read(b.fd, 3 * PS, 0, "ram")
    with pytest.raises(ValueError, match=f"ram ended 0 bytes into a 4096-byte read at "
                                         f"{b.size:#x}"):
        buf.read(b.fd, PS, b.size, "ram")
    # closing while a piece is still held (an error's traceback may hold one) raises
    # nothing; the piece stays readable and the mapping goes with it
    buf.close()
    assert bytes(first[PS:PS + 5]) == b"piece"


def test_zero_ram_zeroes_the_pages_holding_data(side: Side) -> None:
    b = side.guest.ram[0]
    with b.view() as mem:
        mem[:] = bytes(len(mem))
        mem[3 * PS:3 * PS + 2] = b"\x01\x02"
        mem[7 * PS + PS - 1] = 9
    assert zero_ram(side.kernel, [b], PS) == 2
    assert nonzero_page_runs(side.kernel, b.fd, 0, 0, b.size // PS, PS) == []


# -- cost model and bandwidth cap --------------------------------------------------------
def test_cost_model_separates_bytes_from_records() -> None:
    m = CostModel()
    assert m.fit() == (0.0, m.prior)
    for nbytes, items in ((32 * MiB, 8), (4 * MiB, 1000), (16 * MiB, 300), (MiB, 40)):
        m.add(nbytes, items, nbytes * 2e-9 + items * 50e-6)
    per_byte, per_item = m.fit()
    assert per_byte == pytest.approx(2e-9, rel=1e-6)
    assert per_item == pytest.approx(50e-6, rel=1e-6)


def test_cost_model_falls_back_to_the_prior_without_spread() -> None:
    m = CostModel(prior_per_item_s=10e-6)
    for _ in range(5):
        m.add(MiB, 16, MiB * 1e-9 + 16 * 10e-6)
    per_byte, per_item = m.fit()
    assert per_item == 10e-6 and per_byte == pytest.approx(1e-9, rel=1e-6)
    assert records_for(np.array([1, 1024, 1025, 3000]), 1024) == 1 + 1 + 2 + 3


class Recorder:
    def __init__(self) -> None:
        self.sent: list[int] = []
        self.peer_checks = 0

    def send_buffers(self, buffers: Any) -> None:
        self.sent.append(sum(memoryview(b).nbytes for b in buffers))

    def check_peer(self) -> None:
        self.peer_checks += 1


def test_throttled_link_paces_to_the_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    inner = Recorder()
    link = ThrottledLink(inner, 1e6, burst_bytes=100_000, clock=lambda: now[0], sleep=sleep)
    link.send_buffers([bytes(250_000), memoryview(bytes(750_000))])
    assert sum(inner.sent) == 1_000_000 and max(inner.sent) <= 100_000
    assert now[0] == pytest.approx(0.9, rel=1e-6)     # the first burst was free
    link.check_peer()
    assert inner.peer_checks == 1


def test_throttled_link_ready_bytes_are_its_bucket_now() -> None:
    """What a send passes before pacing: the bucket, refilled at the rate up to the burst
    (the prediction takes these bytes off the stop-and-copy's time)."""
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    link = ThrottledLink(Recorder(), 1e6, burst_bytes=100_000, clock=lambda: now[0],
                         sleep=sleep)
    assert link.ready_bytes() == 100_000               # a fresh link's bucket is full
    link.send_buffers([bytes(100_000)])
    assert link.ready_bytes() == 0
    now[0] += 0.03                                     # 30 ms refill 30,000 bytes
    assert link.ready_bytes() == 30_000
    now[0] += 1.0                                      # never more than the burst
    assert link.ready_bytes() == 100_000


def test_throttled_link_bad_rate() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        ThrottledLink(Recorder(), 0)


def test_session_config_bad_values() -> None:
    with pytest.raises(ValueError, match="slice_bytes must be positive"):
        SessionConfig(slice_bytes=0)


# -- status -----------------------------------------------------------------------------
def test_status_formatting() -> None:
    assert device_column([MigState.PRE_COPY, MigState.RUNNING, MigState.PRE_COPY]) \
        == "RUNNING|SAVING/RUNNING"
    assert triple(GuestState.RUNNING, MigrationState.ACTIVE, [MigState.PRE_COPY]) \
        == "(RUNNING, ACTIVE, RUNNING|SAVING)"
    assert triple(None, None, []) == "(-, -, -)"
    p = IterationProgress(3, 1.5, 3 * MiB, 4096, 10 * MiB, 2 * MiB, 2 * MiB - 4096, 4096,
                          5e6, 100e6, "measured", 0.0213, False, "continue", "why", 0.001)
    line = format_progress_line(p)
    words = " ".join(line.split())
    for part in ("iter 3", "sent 3.0 MiB", "remaining 2.0 MiB", "dirty 5.0 MB/s",
                 "bw 100.0 MB/s", "predicted downtime 21.3 ms", "will not converge"):
        assert part in words, line
    assert p.to_dict()["predicted_downtime_s"] == 0.0213


def test_tracker_snapshot_is_shown_with_the_keys_status_always_had() -> None:
    c = ContainerStatus("c0", "type1", True, 4096, "pinned-page scope", True, 8 * MiB, 2,
                        ("0000:3b:00.1",), True, "queried type1", ("device-logging -> type1",),
                        (), ("note",))
    t = TrackerStatus(True, 4096, 2048, 7, 3, 1e6, None, (c,))
    view = tracker_view(t)
    assert view == {
        "running": True, "page_size": 4096, "guest_pages": 2048, "dirty_pages": 7,
        "syncs": 3, "dirty_rate_bytes_per_s": 1e6, "dirty_rate_smoothed_bytes_per_s": None,
        "containers": [{
            "name": "c0", "tracker": "type1", "precise": True, "page_size": 4096,
            "reason": "pinned-page scope", "running": True, "mapped_bytes": 8 * MiB,
            "mappings": 2, "opt_out_devices": ["0000:3b:00.1"], "opt_out_active": True,
            "last_sync": "queried type1", "fallbacks": ["device-logging -> type1"],
            "errors": [], "notes": ["note"]}]}
    assert json.loads(json.dumps(view)) == view


# -- guest model ------------------------------------------------------------------------
def test_guest_rejects_bad_ram(side: Side) -> None:
    k = side.kernel
    with pytest.raises(ValueError, match="must be positive multiples"):
        build_guest(k, GuestPlan("g", (RamRegion("ram", 0, 1000),)))
    with pytest.raises(ValueError, match="overlaps"):
        build_guest(k, GuestPlan("g", (RamRegion("a", 0, 2 * PS), RamRegion("b", PS, 2 * PS))))
    with pytest.raises(ValueError, match="exists"):
        build_guest(k, GuestPlan("g", (RamRegion("a", 0, PS), RamRegion("a", PS, PS))))
    with pytest.raises(ValueError, match="page size"):
        Guest(k, "g", page_size=1000)


def test_guest_rejects_bad_containers(tmp_path: Path) -> None:
    s = build_side(tmp_path, "h", [SideContainer([spec("v2_precopy_log")])])
    try:
        g, n = s.guest, s.guest.devices[0].name
        grp = s.host.group_of(n)
        with pytest.raises(ValueError, match="container 'c0' exists"):
            g.add_container("c0", [grp])
        with pytest.raises(ValueError, match="is not inside RAM region"):
            g.map_dma(g.containers[0], 6 * MiB, 4 * MiB)
        with pytest.raises(ValueError, match="not in RAM"):
            g.block_at(64 * MiB)
        with pytest.raises(KeyError, match="has no device 'nope'"):
            g.device("nope")
        with pytest.raises(ValueError, match="to RUNNING"):
            g.pause(GuestState.RUNNING)
    finally:
        s.close()


def test_guest_container_names_only_its_devices(tmp_path: Path) -> None:
    a, b = spec("v2_precopy_log"), spec("v2_stop_copy_log")
    s = build_side(tmp_path, "h", [SideContainer([a])])
    try:
        grp = s.host.group_of(b.name) if b.name in s.host.devices else None
        assert grp is None
        with pytest.raises(ValueError, match="not in container c9"):
            s.guest.add_container("c9", [], pre_copy_dirty_page_tracking={b.name: False})
        with pytest.raises(ValueError, match="are not in groups"):
            s.guest.add_container("c8", [], devices=[b.name])
    finally:
        s.close()


def test_run_state_handlers_all_hear_and_errors_surface(side: Side) -> None:
    heard: list[tuple[GuestState, GuestState]] = []

    def bad(old: GuestState, new: GuestState) -> None:
        raise RuntimeError("handler broke")

    side.guest.add_run_state_handler(bad)
    side.guest.add_run_state_handler(lambda o, n: heard.append((o, n)))
    with pytest.raises(RuntimeError, match="handler broke"):
        side.guest.pause()
    assert heard == [(GuestState.RUNNING, GuestState.PAUSED)]
    assert side.guest.run_state is GuestState.PAUSED
    side.guest.pause()                 # same state: nobody is told again
    assert len(heard) == 1


def test_guest_close_releases_everything(tmp_path: Path) -> None:
    s = build_side(tmp_path, "h", [SideContainer([spec("v1_log"), spec("v2_p2p_log")])])
    assert sorted(s.open_kinds()) == ["container", "device", "device", "group", "group"]
    s.guest.close()
    assert s.kernel.open_files() == {}
    s.guest.close()                    # idempotent
    s.host.close()


# -- workload ---------------------------------------------------------------------------
def targets(s: Side) -> list[DmaTarget]:
    return [DmaTarget(s.guest.devices[0].name, 0, 2 * MiB)]


def test_workload_is_deterministic_from_its_seed(tmp_path: Path) -> None:
    sides = [build_side(tmp_path / str(i), "h", [SideContainer([spec("v2_precopy_log")])])
             for i in range(3)]
    try:
        digests_ = []
        for i, s in enumerate(sides):
            wl = Workload(s.host, targets(s), WorkloadConfig(seed=7 if i < 2 else 8))
            assert wl.run_writes(25) > 0
            digests_.append((s.ram_digest(), s.models()))
        assert digests_[0] == digests_[1] != digests_[2]
    finally:
        for s in sides:
            s.close()


def test_workload_pause_resume_stop(side: Side) -> None:
    wl = Workload(side.host, targets(side), WorkloadConfig(dirty_rate_bps=50e6, seed=2))
    side.guest.add_run_state_handler(wl.on_run_state)
    wl.start()
    wl.wait_for_writes(5)
    side.guest.pause()                 # returns only once no write is in flight
    n, ram = wl.writes, side.ram_digest()
    assert wl.paused and not wl._in_write
    with pytest.raises(TimeoutError, match="writes after"):
        wl.wait_for_writes(n + 1, timeout=0.2)
    assert wl.writes == n and side.ram_digest() == ram
    side.guest.resume()
    wl.wait_for_writes(n + 3)
    wl.stop()
    assert wl.error is None and wl.stats()["writes"] >= n + 3
    with pytest.raises(RuntimeError, match="already started"):
        wl.start()


def test_workload_errors(side: Side) -> None:
    with pytest.raises(ValueError, match="page multiples"):
        WorkloadConfig(min_write=100)
    with pytest.raises(ValueError, match="at least one DMA target"):
        Workload(side.host, [])
    with pytest.raises(KeyError, match="no simulated VFIO device"):
        Workload(side.host, [DmaTarget("0000:99:00.0", 0, MiB)])
    with pytest.raises(ValueError, match="must be page aligned"):
        Workload(side.host, [DmaTarget(side.guest.devices[0].name, 0, 4096)])
    # a device writing where nothing is mapped: an IOMMU fault, kept in stats()
    wl = Workload(side.host, [DmaTarget(side.guest.devices[0].name, 64 * MiB, MiB)])
    with pytest.raises(KernelError) as e:
        wl.write_once()
    assert e.value.errno == errno.EFAULT


def test_fill_is_deterministic_and_bounded() -> None:
    a, b = bytearray(8 * MiB), bytearray(8 * MiB)
    ext = fill(memoryview(a), 3 * MiB, seed=4, extent=MiB)
    fill(memoryview(b), 3 * MiB, seed=4, extent=MiB)
    assert a == b and len(ext) == 3 and all(n == MiB for _, n in ext)
    assert sum(1 for i in range(8) if any(a[i * MiB:(i + 1) * MiB])) == 3
    with pytest.raises(ValueError, match="into a"):
        fill(memoryview(a), 9 * MiB)


@pytest.mark.parametrize("ram_runs", [True, False])
def test_a_piece_costs_its_record_kinds_prior_until_the_passes_measure_it(
        tmp_path: Path, ram_runs: bool) -> None:
    """Before the passes separate per-byte from per-piece cost, a piece of a pass costs
    what one costs in a RAM_RUNS record with others, or in a RAM record of its own: with
    the latter's 40 us, a sparse guest's final pass of 60-70 pieces was predicted 2-3 ms
    long for 1.4-1.8 ms taken."""
    side = build_side(tmp_path, "hostA", [SideContainer([spec("v2_precopy_log")])],
                      ram=(RamRegion("ram", 0, 8 * MiB),))
    g = side.guest
    header = StreamHeader("hostA", "m1", g.name, g.page_size, g.ram_regions(), (),
                          ram_runs=ram_runs)
    writer = StreamWriter(Recorder(), header, g.guest_ram())   # type: ignore[arg-type]
    digests = RamDigests(g.ram_regions(), [b.view() for b in g.ram], g.page_size)
    sender = RamSender(writer, g, digests, BandwidthEstimator(), slice_bytes=4 * MiB,
                       record_pages=1024, clock=lambda: 0.0, between=lambda: None)
    try:
        assert sender.cost.fit() == (0.0, PIECE_PRIOR_S if ram_runs else RECORD_PRIOR_S)
        assert PIECE_PRIOR_S < RECORD_PRIOR_S
    finally:
        del sender, writer, digests
        side.close()
