"""Whole migrations over loopback TCP between two simulated hosts, for every way a device
can offer migration (docs/architecture.md §1 steps 4-5; docs/kernel-contract.md §5, §6.10): each ends with a
destination that verified every digest, RAM equal to the source's (full digest) and
device states equal to the source's, and a source that released every fd."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.support.hooks import HOOKS
from tests.support.session_rig import (
    MiB,
    SideContainer,
    add_workload,
    assert_migrated,
    migrate,
    pair,
    spec,
)
from vfiod.kernel.sim.workload import DmaTarget
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import SessionConfig
from vfiod.migration.session.status import IterationProgress, format_progress_line
from vfiod.migration.states import GuestState, MigrationState, MigState
from vfiod.vfio import RamRegion

CAPS = ["v1_log", "v2_stop_copy_log", "v2_precopy_log", "v2_p2p_log", "v2_precopy_p2p_log"]


@pytest.fixture
def sides(tmp_path: Path):
    made = []

    def make(plans, **kw):  # noqa: ANN001, ANN202
        s, d = pair(tmp_path, plans, **kw)
        made.extend((s, d))
        return s, d
    yield make
    for side in made:
        side.close()


def arcs(side, name: str) -> list[str]:  # noqa: ANN001
    """The state changes the source kernel saw for ``name`` (v2 arcs / v1 writes)."""
    out = []
    for e in side.kernel.faults.log:
        point, _, target = e.partition("@")
        if target == name and (point.startswith("transition:") or point in (
                "v1:SAVING|RUNNING", "v1:SAVING", "v1:STOP", "v1:RUNNING", "v1:RESUMING")):
            out.append(point.removeprefix("transition:"))
    return out


@pytest.mark.parametrize("cap", CAPS)
def test_one_device_each_protocol(sides, cap: str) -> None:
    src, dst = sides([SideContainer([spec(cap)])], fill_bytes=2 * MiB)
    run = migrate(src, dst)
    assert_migrated(src, dst, run)
    assert run.source.iterations >= 1
    assert run.source.device_bytes_sent > 0
    # the identity record crossed and was checked: the destination loaded the device
    assert run.dest is not None and run.dest.failed_hook is None


def test_v2_stop_copy_only_sends_device_state_in_stop_copy(sides) -> None:
    src, dst = sides([SideContainer([spec("v2_stop_copy_log")])])
    run = migrate(src, dst)
    assert_migrated(src, dst, run)
    name = spec("v2_stop_copy_log").name
    # no pre-copy session: RUNNING -> STOP -> STOP_COPY only when stopping, then STOP
    assert arcs(src, name) == ["RUNNING->STOP", "STOP->STOP_COPY", "STOP_COPY->STOP"]
    assert all(p.device_sent_bytes == 0 for p in run.source.history)


def test_v2_precopy_reads_device_data_while_running(sides) -> None:
    src, dst = sides([SideContainer([spec("v2_precopy_log")])], fill_bytes=1 * MiB)
    run = migrate(src, dst)
    assert_migrated(src, dst, run)
    assert run.source.history[0].device_sent_bytes > 0
    name = spec("v2_precopy_log").name
    assert arcs(src, name) == ["RUNNING->PRE_COPY", "PRE_COPY->STOP_COPY", "STOP_COPY->STOP"]


def test_v1_walks_the_bit_sequence(sides) -> None:
    src, dst = sides([SideContainer([spec("v1_log")])], fill_bytes=1 * MiB)
    run = migrate(src, dst)
    assert_migrated(src, dst, run)
    assert arcs(src, spec("v1_log").name) == ["v1:SAVING|RUNNING", "v1:SAVING", "v1:STOP"]
    assert arcs(dst, dst.guest.devices[0].name) == ["v1:RESUMING", "v1:RUNNING"]


def test_several_p2p_devices_quiesce_all_before_any_stops(sides) -> None:
    devs = [spec("v2_precopy_p2p_log"), spec("v2_p2p_log"),
            spec("v2_precopy_p2p_log", name="0000:3f:00.2")]
    src, dst = sides([SideContainer(devs)], fill_bytes=1 * MiB)
    run = migrate(src, dst)
    assert_migrated(src, dst, run)
    order = [e.split("@") for e in src.kernel.faults.log if e.startswith("transition:")]
    quiesce = [i for i, (p, _) in enumerate(order)
               if p.endswith("->PRE_COPY_P2P") or p.endswith("->RUNNING_P2P")]
    stops = [i for i, (p, _) in enumerate(order) if p.endswith("->STOP_COPY")
             or p.endswith("RUNNING_P2P->STOP")]
    assert len(quiesce) == 3 and stops
    assert max(quiesce) < min(stops)          # every device quiesced before any stopped


def test_p2p_skipped_when_one_device_lacks_it(sides) -> None:
    src, dst = sides([SideContainer([spec("v2_precopy_p2p_log"), spec("v2_precopy_log")])])
    run = migrate(src, dst)
    assert_migrated(src, dst, run)
    p2p = spec("v2_precopy_p2p_log").name
    assert arcs(src, p2p)[0] == "RUNNING->PRE_COPY"
    assert arcs(src, p2p)[1] == "PRE_COPY->PRE_COPY_P2P"   # the kernel's own path ...
    assert arcs(src, p2p)[2] == "PRE_COPY_P2P->STOP_COPY"  # ... within one SET STOP_COPY


def test_workload_dirtied_pages_all_arrive(sides) -> None:
    """The guest's devices write its RAM by DMA during pre-copy: the destination ends
    with exactly the source's memory (full digests, not just the stream's)."""
    devs = [spec("v2_precopy_log"), spec("v1_log")]
    src, dst = sides([SideContainer(devs)], ram=(RamRegion("ram", 0, 16 * MiB),),
                     fill_bytes=4 * MiB)
    wl = add_workload(src, [DmaTarget(devs[0].name, 0, 4 * MiB),
                            DmaTarget(devs[1].name, 8 * MiB, 4 * MiB)],
                      dirty_rate_bps=4e6, seed=3)
    wl.start()
    cfg = SessionConfig(policy=Policy(max_iterations=4, on_timeout="force",
                                      downtime_limit_s=1e-9))

    def during_precopy(p: IterationProgress) -> None:
        wl.wait_for_writes(wl.writes + 3)          # the devices write during every pass

    run = migrate(src, dst, cfg, progress=during_precopy)
    assert wl.paused and wl.error is None and wl.writes >= 12, run.source.warnings
    assert_migrated(src, dst, run)
    assert run.source.iterations == 4
    assert run.source.history[-1].decision == "force"


def test_opted_out_device_container_counts_dirty_until_stop(sides) -> None:
    """pre_copy_dirty_page_tracking=false: its container is not queried in pre-copy; the
    prediction counts the part of its mapping a sample of it shows written since tracking
    began (``optout_sample``: here every page of the 2 MiB window is sampled), and the
    pages it wrote are collected in stop-and-copy (docs/architecture.md §3, §4)."""
    opt = spec("v2_stop_copy_log")
    other = spec("v2_precopy_log")
    plans = [SideContainer([other]),
             SideContainer([opt], maps=[(8 * MiB, 2 * MiB)], opt_out=[opt.name])]
    src, dst = sides(plans, ram=(RamRegion("ram", 0, 16 * MiB),), fill_bytes=1 * MiB)
    wl = add_workload(src, [DmaTarget(opt.name, 8 * MiB, 2 * MiB)], dirty_rate_bps=0, seed=5)
    wl.record = True
    wl.run_writes(20)                       # before migrating: part of the first pass
    cfg = SessionConfig(policy=Policy(max_iterations=2, on_timeout="force",
                                      downtime_limit_s=1e-9))
    seen: list[IterationProgress] = []

    def write_more(p: IterationProgress) -> None:
        seen.append(p)
        wl.run_writes(10)                   # written while the opted-out device runs

    run = migrate(src, dst, cfg, progress=write_more)
    assert_migrated(src, dst, run)
    # pre-copy counts what the sample saw written (the writes before migrating are in
    # the first pass, not in the bitmap): one sampled page's margin at first, then more
    # after 10 writes, never the whole window
    counted = [p.assumed_dirty_bytes for p in seen]
    assert len(counted) == 2 and 0 < counted[0] < counted[1] < 2 * MiB, counted
    # in stop-and-copy the container is queried: only the pages really written go
    assert 0 < run.source.verification["final_ram_bytes"] < 2 * MiB
    assert dst.guest.device(dst.guest.devices[1].name).pre_copy_dirty_page_tracking is False


def test_device_without_dirty_tracking_is_all_dirty(sides) -> None:
    """A physical device with no DMA logging in a type1 container: the kernel reports
    every mapped page dirty at every sync; the predictor says it will not converge."""
    src, dst = sides([SideContainer([spec("v2_precopy")])], fill_bytes=1 * MiB)
    cfg = SessionConfig(policy=Policy(max_iterations=2, on_timeout="force",
                                      downtime_limit_s=1e-9))
    run = migrate(src, dst, cfg)
    assert_migrated(src, dst, run)
    h = run.source.history
    assert all(p.dirty_ram_bytes == 8 * MiB for p in h)
    assert not h[-1].will_converge
    assert run.source.verification["final_ram_bytes"] == 8 * MiB


def test_status_shows_the_triple_through_the_phases(sides) -> None:
    src, dst = sides([SideContainer([spec("v2_precopy_log"), spec("v2_stop_copy_log")])])
    seen: list[str] = []
    lines: list[str] = []
    states: list[tuple[str, str]] = []

    def on_source(s) -> None:  # noqa: ANN001
        s.add_state_handler(lambda old, new: states.append((old.name, new.name)))
        s.add_state_handler(lambda old, new: seen.append(s.status().triple))

    def progress(p: IterationProgress) -> None:
        lines.append(format_progress_line(p))

    run = migrate(src, dst, on_source=on_source, progress=progress)
    assert_migrated(src, dst, run)
    assert states == [("NONE", "SETUP"), ("SETUP", "ACTIVE"), ("ACTIVE", "DEVICE"),
                      ("DEVICE", "COMPLETED")]
    assert seen[1] == "(RUNNING, ACTIVE, RUNNING|SAVING/RUNNING)"
    assert seen[2] == "(RUNNING, DEVICE, RUNNING|SAVING/RUNNING)"
    assert seen[3] == "(FINISH_MIGRATE, COMPLETED, SAVING)"   # STOP only at cleanup
    assert lines and "predicted downtime" in lines[0] and "iter   1" in lines[0]
    snap = run.session.status().to_dict()
    assert snap["migration_state"] == "COMPLETED" and snap["guest_state"] == "POSTMIGRATE"


def test_destination_status_and_run_states(sides) -> None:
    src, dst = sides([SideContainer([spec("v2_precopy_log")])])
    guest_states: list[tuple[GuestState, GuestState]] = []
    dst.guest.add_run_state_handler(lambda o, n: guest_states.append((o, n)))
    run = migrate(src, dst)
    assert_migrated(src, dst, run)
    assert guest_states == [(GuestState.RUNNING, GuestState.INMIGRATE),
                            (GuestState.INMIGRATE, GuestState.RUNNING)]
    assert run.dest_session is not None
    assert run.dest_session.state is MigrationState.COMPLETED
    assert run.dest_session.status().triple == "(RUNNING, COMPLETED, RUNNING)"
    assert dst.kernel_states() == {dst.guest.devices[0].name: MigState.RUNNING}


class Recording:
    """A driver that records each hook called on it, then calls the real one."""

    def __init__(self, inner, log: list[str]) -> None:  # noqa: ANN001
        self._inner, self._log = inner, log

    def __getattr__(self, name: str):  # noqa: ANN204
        attr = getattr(self._inner, name)
        if name not in HOOKS:
            return attr

        @functools.wraps(attr)            # the session names a hook by its method's name
        def call(*a, **k):  # noqa: ANN002, ANN003, ANN202
            if not self._log or self._log[-1] != name:      # collapse repeats
                self._log.append(name)
            return attr(*a, **k)
        return call


@pytest.mark.parametrize("cap", ["v1_log", "v2_precopy_p2p_log"])
def test_hook_sequence_is_the_seeds(sides, cap: str) -> None:
    src, dst = sides([SideContainer([spec(cap)])], fill_bytes=1 * MiB)
    slog: list[str] = []
    dlog: list[str] = []
    src.guest.devices[0].driver = Recording(src.guest.devices[0].driver, slog)
    dst.guest.devices[0].driver = Recording(dst.guest.devices[0].driver, dlog)
    run = migrate(src, dst, SessionConfig(policy=Policy(downtime_limit_s=1e-9,
                                                        max_iterations=2,
                                                        on_timeout="force")))
    assert_migrated(src, dst, run)
    p2p = ["quiesce_p2p"] if cap.startswith("v2_precopy_p2p") else []
    assert slog == ["save_setup", "save_state",
                    "save_live_iterate", "save_live_pending",      # pass 1
                    "save_live_iterate", "save_live_pending",      # pass 2
                    *p2p, "save_live_complete_precopy", "cleanup"]
    assert dlog == ["check_state", "load_setup", "load_state", "load_complete", "resume",
                    "cleanup"]


def test_stale_data_in_the_destination_ram_is_cleared_not_kept(sides) -> None:
    """A reused RAM file (a daemon's file-backed guest reopened as incoming) holds old data
    in pages the source never wrote and so never sends: the destination clears them
    before loading, so the migrated RAM equals the source's (seen in the kernel tier)."""
    src, dst = sides([SideContainer([spec("v2_precopy_log")])], fill_bytes=2 * MiB)
    block = dst.guest.ram[0]
    with block.view() as view:
        last = block.size - 4096                  # far past what the fill wrote
        view[last:last + 4096] = b"\xa5" * 4096
        view[8192:8192 + 16] = b"stale guest data"
    run = migrate(src, dst)
    assert_migrated(src, dst, run)                # full RAM digest equal to the source's
    assert run.dest is not None and run.dest.verification["stale_pages_zeroed"] >= 1
