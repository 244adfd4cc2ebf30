"""A whole migration on a real kernel: one mtty instance's guest into another through
vfiod's migration session and stream (docs/architecture.md §1 steps 5-6, §5; docs/kernel-contract.md §6.10, §9.1).

Each side is a ``vfiod.migration.guest.Guest`` over ``LinuxKernel`` (``build_guest``, the
daemon's builder): memfd RAM mapped for DMA on a type1 container holding one mtty-2 mdev. The migration runs over loopback TCP
(the destination session in a thread); the device states each hook leaves behind are read
back from the kernel (``HookLog``), so "RUNNING → PRE_COPY → STOP_COPY → STOP" is what the
kernel says, not what the driver believes. The UART state (registers and FIFO, through
the BARs) and the RAM content prove what arrived.

The session has no save/restore mode over a file (it needs the destination's
acknowledgements on a return path, which a file lacks), so the file target is covered by
the same drivers writing the stream to a ``FileSink`` and restoring from a ``FileSource``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from tests.kernel.guest import rig
from tests.kernel.guest.conftest import close_migratable, open_device
from tests.support.hooks import HookLog
from vfiod.kernel.linux import LinuxKernel
from vfiod.migration.device.protocol import MigrationDriver
from vfiod.migration.guest import DevicePlan, Guest, GuestDevice, GuestPlan, build_guest
from vfiod.migration.planning.hostfacts import HostFacts
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import MigrationResult, SessionConfig
from vfiod.migration.session.dest import DestinationSession
from vfiod.migration.session.source import SourceSession
from vfiod.migration.states import GuestState, MigrationState, MigState
from vfiod.migration.stream import (
    Complete,
    DeviceData,
    EndOfState,
    StreamHeader,
    StreamReader,
    StreamWriter,
)
from vfiod.migration.transport import FileSink, FileSource, Listener, connect
from vfiod.vfio import HostPaths, RamRegion

MiB = 1 << 20
PAGE = 4096
RAM_BYTES = 4 * MiB
#: generous: everything runs under TCG emulation on a busy 2-core host
DEADLINE_S = 60.0


@dataclass
class Side:
    guest: Guest
    dev: GuestDevice
    log: HookLog
    uart: rig.Uart
    facts: HostFacts
    migration_states: list[MigrationState] = field(default_factory=list)
    #: the session's status triple as each migration state began
    triples: dict[MigrationState, str] = field(default_factory=dict)

    def ram(self) -> bytes:
        return bytes(self.guest.ram[0].view())


def build_side(kernel: LinuxKernel, paths: HostPaths, name: str, uuid: str,
               facts: HostFacts) -> Side:
    g = build_guest(kernel, GuestPlan(name, (RamRegion("ram", 0, RAM_BYTES),),
                                      (DevicePlan(uuid, "c0", id="uart0"),)), paths)
    try:
        gd = g.device(uuid)
        log = HookLog(gd)
        gd.driver = cast(MigrationDriver, log)
    except BaseException:
        g.close()
        raise
    return Side(g, gd, log, rig.Uart(gd.device), facts)


@contextmanager
def side_pair(kernel: LinuxKernel, paths: HostPaths, names: tuple[str, str],
              devices: tuple[str, str], facts: HostFacts) -> Iterator[tuple[Side, Side]]:
    """A source and a destination guest (``names``) on ``devices``, closed afterwards."""
    src = build_side(kernel, paths, names[0], devices[0], facts)
    try:
        dst = build_side(kernel, paths, names[1], devices[1], facts)
    except BaseException:
        src.guest.close()
        raise
    try:
        yield src, dst
    finally:
        src.guest.close()
        dst.guest.close()


@pytest.fixture
def sides(kernel: LinuxKernel, paths: HostPaths, mtty_pair: tuple[str, str],
          host_facts: HostFacts) -> Iterator[tuple[Side, Side]]:
    with side_pair(kernel, paths, ("vm-src", "vm-dst"), mtty_pair, host_facts) as pair:
        yield pair
    for uuid in mtty_pair:          # a migrated source stays in STOP after close (mtty)
        close_migratable(open_device(kernel, paths, uuid))


def kernel_state_after_release(kernel: LinuxKernel, paths: HostPaths, uuid: str) -> MigState:
    """Reopen a device the session released and read its state (mtty keeps it)."""
    o = open_device(kernel, paths, uuid)
    try:
        st = o.device.get_mig_state()
        assert isinstance(st, MigState)
        return st
    finally:
        o.container.close()


def fill(side: Side, seed: int) -> None:
    """Data in the first MiB and a page near the end; the rest stays a hole."""
    rng = np.random.default_rng(seed)
    view = side.guest.ram[0].view()
    view[:MiB] = rng.integers(0, 256, MiB, dtype=np.uint8).tobytes()
    view[RAM_BYTES - 3 * PAGE:RAM_BYTES - 2 * PAGE] = b"\xa5" * PAGE


@dataclass
class Run:
    source: MigrationResult
    dest: MigrationResult
    session: SourceSession


def migrate_tcp(src: Side, dst: Side, *,
                on_source: Callable[[SourceSession], None] | None = None) -> Run:
    """One migration over loopback TCP; the destination session runs in a thread."""
    rig.loopback_up()
    # the flow is under test, not the downtime: under TCG on a loaded host the fixed
    # costs alone can exceed the default 300 ms limit, and pre-copy would never end
    config = SessionConfig(ack_timeout_s=DEADLINE_S, policy=Policy(downtime_limit_s=10.0))
    box: dict[str, Any] = {}
    with Listener("127.0.0.1", 0) as lst:
        def destination() -> None:
            try:
                with lst.accept(timeout=DEADLINE_S) as conn:
                    s = DestinationSession(dst.guest, conn, host=dst.facts, config=config)
                    s.add_state_handler(lambda old, new: dst.migration_states.append(new))
                    box["result"] = s.run()
            except BaseException as e:  # noqa: BLE001 - handed to the test below
                box["error"] = e

        t = threading.Thread(target=destination, name="destination-session")
        t.start()
        try:
            with connect("127.0.0.1", lst.address[1], timeout=DEADLINE_S) as conn:
                s = SourceSession(src.guest, conn, host=src.facts, config=config)

                def record(old: MigrationState, new: MigrationState) -> None:
                    src.migration_states.append(new)
                    src.triples[new] = s.status().triple
                s.add_state_handler(record)
                if on_source is not None:
                    on_source(s)
                res = s.run()
        finally:
            t.join(DEADLINE_S)
    assert not t.is_alive(), f"the destination session did not end within {DEADLINE_S} s"
    assert "error" not in box, f"the destination session raised {box['error']!r}"
    return Run(res, box["result"], s)


def is_subsequence(part: list[str], whole: list[str]) -> bool:
    it = iter(whole)
    return all(x in it for x in part)


def test_session_migrates_mtty_over_loopback_tcp(
        kernel: LinuxKernel, paths: HostPaths, mtty_pair: tuple[str, str],
        sides: tuple[Side, Side], numba_cache: None) -> None:
    src, dst = sides
    programmed = src.uart.program(seed=0x6B)
    dst.uart.program(seed=0xB6)
    before = src.uart.snapshot()
    assert dst.uart.snapshot() != before            # so equality afterwards means something
    fill(src, seed=7)
    src_ram = src.ram()

    run = migrate_tcp(src, dst)
    r, d = run.source, run.dest
    assert (r.result, d.result) == ("completed", "completed"), (r.reason, d.reason,
                                                                r.failed_hook, d.failed_hook)
    assert r.verified is True and d.verified is True
    assert d.verification["manifest"]["verified"] is True
    assert r.device_bytes_sent >= 96        # mtty-2's whole state went through the stream
    assert r.actual_downtime_s is not None and r.predicted_downtime_s is not None

    # the source: RUNNING -> PRE_COPY -> (P2P quiesce) -> STOP_COPY -> STOP, then released
    assert src.log.states() == [MigState.RUNNING, MigState.PRE_COPY, MigState.PRE_COPY_P2P,
                                MigState.STOP_COPY, MigState.STOP]
    assert is_subsequence(["save_setup", "save_state", "save_live_iterate",
                           "save_live_pending", "quiesce_p2p", "save_live_complete_precopy",
                           "cleanup"], src.log.hooks())
    assert src.migration_states[:3] == [MigrationState.SETUP, MigrationState.ACTIVE,
                                        MigrationState.DEVICE]
    assert src.migration_states[-1] is MigrationState.COMPLETED
    # status speaks the seed's flow-diagram vocabulary, fed by the real device state
    assert src.triples[MigrationState.ACTIVE] == "(RUNNING, ACTIVE, RUNNING|SAVING)"
    assert src.guest.run_state is GuestState.POSTMIGRATE
    assert src.dev.device.closed
    assert kernel_state_after_release(kernel, paths, mtty_pair[0]) is MigState.STOP

    # the destination: RESUMING -> STOP (the driver validated) -> RUNNING
    assert dst.log.states() == [MigState.RUNNING, MigState.RESUMING, MigState.STOP,
                                MigState.RUNNING]
    assert is_subsequence(["check_state", "load_setup", "load_state", "load_complete",
                           "resume"], dst.log.hooks())
    assert dst.migration_states[-1] is MigrationState.COMPLETED
    assert dst.guest.run_state is GuestState.RUNNING

    # what arrived: guest RAM byte for byte, the UART registers and the FIFO contents;
    # the source only ever read its memory
    assert src.ram() == src_ram
    assert dst.ram() == src_ram
    assert dst.uart.snapshot() == before
    for port, prog in enumerate(programmed):
        assert dst.uart.drain(port) == prog.fifo


def test_session_cancelled_in_precopy_rolls_both_sides_back(
        sides: tuple[Side, Side], numba_cache: None) -> None:
    src, dst = sides
    src.uart.program(seed=0x2D)
    dst.uart.program(seed=0xD2)
    src_before, dst_before = src.uart.snapshot(), dst.uart.snapshot()
    assert src_before != dst_before
    fill(src, seed=9)
    src_ram = src.ram()

    def cancel_when_active(s: SourceSession) -> None:
        # handlers run on the session's thread: the cancel is seen at the next safe point
        def handler(old: MigrationState, new: MigrationState) -> None:
            if new is MigrationState.ACTIVE:
                assert s.cancel("test: cancel in pre-copy")
        s.add_state_handler(handler)

    run = migrate_tcp(src, dst, on_source=cancel_when_active)
    assert run.source.result == "cancelled", run.source.reason
    assert "cancel in pre-copy" in run.source.reason
    assert run.dest.result == "cancelled", run.dest.reason
    assert src.migration_states[-2:] == [MigrationState.CANCELLING, MigrationState.CANCELLED]

    # the source got into pre-copy and came back; its device still works as before
    assert src.log.states() == [MigState.RUNNING, MigState.PRE_COPY, MigState.RUNNING]
    assert src.dev.device.get_mig_state() is MigState.RUNNING
    assert src.guest.run_state is GuestState.RUNNING
    assert run.session.tracker is not None and not run.session.tracker.running
    assert src.uart.snapshot() == src_before
    assert src.ram() == src_ram
    src.uart.write(0, rig.UART_SCR, 0x42)
    assert src.uart.read(0, rig.UART_SCR) == 0x42

    # the destination began resuming, then discarded it by reset: its own state, running
    assert dst.log.states() == [MigState.RUNNING, MigState.RESUMING, MigState.RUNNING]
    assert dst.dev.device.get_mig_state() is MigState.RUNNING
    assert dst.uart.snapshot() == dst_before


def test_session_rolls_back_when_the_destination_kernel_refuses_the_state(
        sides: tuple[Side, Side], numba_cache: None) -> None:
    """The source's stop-copy data reaches the stream one port record short (checksums
    intact), so the destination's RESUMING -> STOP fails in the mtty driver (EINVAL):
    the destination resets its device and reports the failure, the source rolls back from
    STOP_COPY to RUNNING and resumes the guest."""
    src, dst = sides
    src.uart.program(seed=0x4E)
    dst.uart.program(seed=0xE4)
    src_before, dst_before = src.uart.snapshot(), dst.uart.snapshot()
    assert src_before != dst_before
    fill(src, seed=13)
    src_ram = src.ram()
    src.log.stopcopy_keep = 36          # of 72: the second port's record never leaves

    run = migrate_tcp(src, dst)
    d = run.dest
    assert d.result == "failed"
    assert d.failed_hook == f"load_complete on {dst.dev.name}"
    assert "EINVAL" in d.reason and "MIG_DEVICE_STATE STOP" in d.reason
    assert run.source.result == "failed", run.source.reason

    # destination: the ladder reset the device; nothing it received was applied
    assert dst.log.states() == [MigState.RUNNING, MigState.RESUMING, MigState.RUNNING]
    assert dst.dev.device.get_mig_state() is MigState.RUNNING
    assert dst.uart.snapshot() == dst_before
    # source: from STOP_COPY back to RUNNING, guest running, memory and device intact
    assert src.log.states() == [MigState.RUNNING, MigState.PRE_COPY, MigState.PRE_COPY_P2P,
                                MigState.STOP_COPY, MigState.RUNNING]
    assert src.dev.device.get_mig_state() is MigState.RUNNING
    assert src.guest.run_state is GuestState.RUNNING
    assert src.uart.snapshot() == src_before
    assert src.ram() == src_ram
    assert run.session.tracker is not None and not run.session.tracker.running

    # nothing half-done remains: without the fault the same two guests migrate
    src.log.stopcopy_keep = None
    again = migrate_tcp(src, dst)
    assert (again.source.result, again.dest.result) == ("completed", "completed"), (
        again.source.reason, again.dest.reason)
    assert dst.uart.snapshot() == src_before
    assert dst.ram() == src_ram


def test_stream_through_a_file_target_restores_device_and_ram(
        kernel: LinuxKernel, sides: tuple[Side, Side], tmp_path: Path,
        numba_cache: None) -> None:
    """Save to a snapshot file with the stream writer and the source's driver, restore
    from it with the stream reader and the destination's driver."""
    src, dst = sides
    programmed = src.uart.program(seed=0x5A)
    dst.uart.program(seed=0xA5)
    before = src.uart.snapshot()
    assert dst.uart.snapshot() != before
    fill(src, seed=11)
    path = str(tmp_path / "vm.snapshot")
    name = src.dev.name
    header = StreamHeader("guest-host", "snapshot-1", src.guest.name, PAGE,
                          src.guest.ram_regions(), src.guest.device_infos())
    d = src.dev.driver
    with FileSink(kernel, path) as sink:
        w = StreamWriter(sink, header, src.guest.guest_ram())
        w.start()
        d.save_setup()
        w.send_device_data(name, d.save_state())      # the identity record goes first

        def to_stream(chunk: bytes | memoryview) -> None:
            w.send_device_data(name, chunk)
        while d.save_live_iterate(to_stream, MiB):
            pass
        d.quiesce_p2p()
        w.send_ram([(0, RAM_BYTES // PAGE)], quiescent=True)
        d.save_live_complete_precopy(to_stream)
        w.end_of_state(name)
        w.finish()
    d.cleanup()
    assert src.log.states() == [MigState.RUNNING, MigState.PRE_COPY, MigState.PRE_COPY_P2P,
                                MigState.STOP_COPY, MigState.STOP]

    dd = dst.dev.driver
    events: list[str] = []
    with FileSource(kernel, path) as source:
        r = StreamReader(source)
        h = r.read_header()
        assert [x.name for x in h.devices] == [name]
        r.attach_ram(dst.guest.guest_ram(writable=True))
        first = True
        for ev in r.events():
            events.append(type(ev).__name__)
            if isinstance(ev, DeviceData):
                if first:
                    dd.check_state(bytes(ev.data))
                    dd.load_setup()
                    first = False
                else:
                    dd.load_state(ev.data)
            elif isinstance(ev, EndOfState):
                dd.load_complete()
            elif isinstance(ev, Complete):
                break
        r.expect_end()
    assert events[-2:] == ["EndOfState", "Complete"]
    dd.resume()
    assert dst.log.states() == [MigState.RUNNING, MigState.RESUMING, MigState.STOP,
                                MigState.RUNNING]
    assert dst.ram() == src.ram()
    assert dst.uart.snapshot() == before
    for port, prog in enumerate(programmed):
        assert dst.uart.drain(port) == prog.fifo
