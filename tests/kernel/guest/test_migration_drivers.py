"""vfiod's migration drivers against a real v2 driver (mtty on Linux 6.12; docs/kernel-contract.md §6,
§9.1; docs/architecture.md §1.4-§1.6): ``probe``, the source hooks (save_setup → save_live_pending /
save_live_iterate → quiesce_p2p → save_live_complete_precopy → cleanup), the destination
hooks (load_setup → load_state → load_complete → resume), cancel in pre-copy and after
stop-copy, and rollback after a destination stream the kernel refuses.

Every state is read back from the kernel (GET MIG_DEVICE_STATE), not taken from the
driver's bookkeeping; the UART state (registers and FIFO, programmed through the BARs)
proves what moved and that a rolled-back device still works.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

import vfiod.abi.vfio as v
from tests.kernel.guest import rig
from tests.kernel.guest.conftest import Opened, close_migratable, open_device
from vfiod.errors import KernelError, NotMigratable
from vfiod.kernel.linux import LinuxKernel
from vfiod.migration.device.errors import DeviceMismatch, DeviceTransitionError, HookOrderError
from vfiod.migration.device.probe import probe
from vfiod.migration.device.protocol import HookPhase, Pending
from vfiod.migration.device.record import encode_record
from vfiod.migration.device.v2 import V2Driver
from vfiod.migration.states import MigState
from vfiod.vfio import Device, HostPaths

MTTY2_BYTES = 24 + 2 * 36           # header + two serial_port records (MIG_DATA_SIZE)


class Chunks:
    """A driver ``DeviceDataSink``: copies each chunk (the driver reuses its buffer)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def __call__(self, chunk: bytes | memoryview) -> None:
        self.chunks.append(bytes(chunk))

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def kernel_state(d: V2Driver) -> MigState:
    st = d.device.get_mig_state()
    assert isinstance(st, MigState), st
    return st


def v2(device: Device) -> V2Driver:
    d = probe(device)
    assert isinstance(d, V2Driver), d
    return d


@pytest.fixture
def src(mtty: Opened) -> Iterator[V2Driver]:
    d = v2(mtty.device)
    yield d
    d.cleanup()                      # closes a data fd the test left open


@pytest.fixture
def dst(mtty_dst: Opened) -> Iterator[V2Driver]:
    d = v2(mtty_dst.device)
    yield d
    d.cleanup()


def save_all(d: V2Driver) -> Chunks:
    """The whole source sequence up to the end of the stream (device left in STOP_COPY)."""
    out = Chunks()
    d.save_setup()
    while d.save_live_iterate(out, 1 << 20):
        pass
    d.quiesce_p2p()
    d.save_live_complete_precopy(out)
    return out


def test_probe_picks_v2_with_precopy_and_p2p(src: V2Driver) -> None:
    assert (src.protocol, src.has_precopy, src.has_p2p) == ("v2", True, True)
    assert src.migration_flags == (v.VFIO_MIGRATION_STOP_COPY | v.VFIO_MIGRATION_P2P
                         | v.VFIO_MIGRATION_PRE_COPY)
    assert src.phase is HookPhase.IDLE
    assert src.state() is MigState.RUNNING is kernel_state(src)


def test_probe_says_why_edu_is_not_migratable(edu_dev: Opened) -> None:
    with pytest.raises(NotMigratable) as ei:
        probe(edu_dev.device)
    # vfio-pci without migration ops answers ENOTTY; there is no v1 region either
    assert "ENOTTY" in ei.value.reason
    assert "no v1 migration region" in ei.value.reason
    assert ei.value.device == edu_dev.device.name


def test_pending_and_iterate_follow_precopy_info(src: V2Driver) -> None:
    # before the session: no pre-copy data, the stop-copy size from MIG_DATA_SIZE
    assert src.save_live_pending() == Pending(0, MTTY2_BYTES, True)
    src.save_setup()
    assert kernel_state(src) is MigState.PRE_COPY
    assert src.data_fd >= 0
    assert src.save_live_pending() == Pending(24, MTTY2_BYTES, True)
    out = Chunks()
    assert src.save_live_iterate(out, 10) == 10          # max_bytes is honoured
    assert src.save_live_pending() == Pending(14, MTTY2_BYTES, True)
    assert src.save_live_iterate(out, 1 << 20) == 14
    assert int.from_bytes(out.data[:8], "little") == 0x7E9D09898C3E2C4E   # mtty's magic
    # the end of pre-copy data: mtty reads 0 there, which is "nothing now", not EOF
    assert src.save_live_pending() == Pending(0, MTTY2_BYTES, True)
    assert src.save_live_iterate(out, 1 << 20) == 0
    assert kernel_state(src) is MigState.PRE_COPY
    assert src.rollback() is MigState.RUNNING


def test_drivers_migrate_uart_state(src: V2Driver, dst: V2Driver) -> None:
    src_uart, dst_uart = rig.Uart(src.device), rig.Uart(dst.device)
    programmed = src_uart.program(seed=0x3C)
    dst_uart.program(seed=0xC3)                     # something else to overwrite
    before = src_uart.snapshot()
    assert before != dst_uart.snapshot()

    # source: pre-copy, P2P quiesce, stop-copy to the end of the stream
    out = Chunks()
    src.save_setup()
    assert kernel_state(src) is MigState.PRE_COPY
    src.save_live_iterate(out, 1 << 20)
    src.quiesce_p2p()
    assert kernel_state(src) is MigState.PRE_COPY_P2P
    assert src.save_live_complete_precopy(out) == MTTY2_BYTES - 24
    assert kernel_state(src) is MigState.STOP_COPY
    assert src.phase is HookPhase.SAVED
    stream = out.data
    assert len(stream) == MTTY2_BYTES

    # destination: identity check, resume session, validate on RESUMING -> STOP, run
    dst.check_state(src.save_state())
    dst.load_setup()
    assert kernel_state(dst) is MigState.RESUMING
    for chunk in out.chunks:
        dst.load_state(chunk)
    dst.load_complete()
    assert kernel_state(dst) is MigState.STOP
    dst.resume()
    assert kernel_state(dst) is MigState.RUNNING
    assert dst.phase is HookPhase.RESUMED

    # the source is done only now: its saving session ends in STOP
    src.cleanup()
    assert kernel_state(src) is MigState.STOP
    assert src.data_fd == -1

    assert dst_uart.snapshot() == before
    # the whole device state, not just what the registers show: save the destination
    # again and compare the port records byte for byte (divisor, FIFO indices...)
    again = v2(dst.device)
    try:
        dst_stream = save_all(again).data
    finally:
        assert again.rollback() is MigState.RUNNING
    assert rig.mtty_port_records(dst_stream) == rig.mtty_port_records(stream)
    # and the FIFO bytes queued on the source come out of the destination's RX
    for port, prog in enumerate(programmed):
        assert dst_uart.drain(port) == prog.fifo


def test_cancel_in_precopy_returns_to_running(src: V2Driver) -> None:
    uart = rig.Uart(src.device)
    uart.program(seed=0x11)
    before = uart.snapshot()
    src.save_setup()
    src.save_live_iterate(Chunks(), 1 << 20)
    assert kernel_state(src) is MigState.PRE_COPY
    assert src.rollback() is MigState.RUNNING
    assert kernel_state(src) is MigState.RUNNING
    assert (src.phase, src.data_fd) == (HookPhase.IDLE, -1)
    # the device works: its state is intact and takes new writes
    assert uart.snapshot() == before
    uart.write(1, rig.UART_SCR, 0x77)
    assert uart.read(1, rig.UART_SCR) == 0x77
    # and it can migrate again: a new session with a new header
    out = Chunks()
    src.save_setup()
    assert kernel_state(src) is MigState.PRE_COPY
    src.save_live_iterate(out, 1 << 20)
    assert len(out.data) == 24
    assert src.rollback() is MigState.RUNNING


def test_cancel_after_p2p_quiesce_returns_to_running(src: V2Driver) -> None:
    src.save_setup()
    src.quiesce_p2p()
    assert kernel_state(src) is MigState.PRE_COPY_P2P
    assert src.rollback() is MigState.RUNNING
    assert kernel_state(src) is MigState.RUNNING


def test_cancel_after_stop_copy_returns_to_running(src: V2Driver) -> None:
    uart = rig.Uart(src.device)
    progs = uart.program(seed=0x22)
    before = uart.snapshot()
    assert len(save_all(src).data) == MTTY2_BYTES
    assert kernel_state(src) is MigState.STOP_COPY
    # STOP_COPY -> RUNNING: the kernel walks STOP, RUNNING_P2P (never a PRE_COPY state)
    assert src.rollback() is MigState.RUNNING
    assert kernel_state(src) is MigState.RUNNING
    assert uart.snapshot() == before
    assert uart.drain(0) == progs[0].fifo


def _truncated(stream: bytes) -> bytes:
    # the 24-byte header and exactly one of the two 36-byte ports: the second is missing
    return stream[:rig.MTTY_HEADER_BYTES + rig.MTTY_PORT_BYTES]


def _foreign_magic(stream: bytes) -> bytes:
    return bytes([stream[0] ^ 0xFF]) + stream[1:]


def _overlong(stream: bytes) -> bytes:
    return stream + b"\0"


# (how the stream is damaged, the hook the kernel refuses it at, the kernel's errno):
# docs/kernel-contract.md §9.1: the header is checked once 24 bytes arrived (EFAULT), writes beyond
# MIG_DATA_SIZE fail (ENOMEM), and RESUMING -> STOP with a short stream is EINVAL.
BAD_STREAMS = [
    pytest.param(_truncated, "load_complete", errno.EINVAL, id="truncated"),
    pytest.param(_foreign_magic, "load_state", errno.EFAULT, id="foreign-magic"),
    pytest.param(_overlong, "load_state", errno.ENOMEM, id="overlong"),
]


@pytest.mark.parametrize(("damage", "refused_at", "err"), BAD_STREAMS)
def test_refused_stream_rolls_both_ends_back(src: V2Driver, dst: V2Driver, damage: object,
                                             refused_at: str, err: int) -> None:
    assert callable(damage)
    src_uart, dst_uart = rig.Uart(src.device), rig.Uart(dst.device)
    src_uart.program(seed=0x5E)
    dst_uart.program(seed=0xE5)
    src_before, dst_before = src_uart.snapshot(), dst_uart.snapshot()
    assert src_before != dst_before
    stream = damage(save_all(src).data)

    dst.load_setup()
    with pytest.raises(KernelError) as ei:
        dst.load_state(stream)
        dst.load_complete()
    assert ei.value.errno == err
    if refused_at == "load_complete":
        e = ei.value
        assert isinstance(e, DeviceTransitionError)
        assert "SET MIG_DEVICE_STATE STOP" in e.op
        # mtty stays in RESUMING; no recovery state exists for it, so the ladder resets
        assert e.rungs[:2] == ["SET STOP: EINVAL", "read back: RESUMING"]
        assert "VFIO_DEVICE_RESET: ok" in e.rungs
        assert (e.final, e.reset) == (MigState.RUNNING, True)
    else:
        assert "write(migration data fd)" in str(ei.value)
        assert kernel_state(dst) is MigState.RESUMING

    # the destination discards what it got (reset) and runs its own, untouched state
    assert dst.rollback() is MigState.RUNNING
    assert kernel_state(dst) is MigState.RUNNING
    assert "VFIO_DEVICE_RESET: ok" in dst.rollback_log
    assert dst_uart.snapshot() == dst_before
    # the source has not lost its device: back to RUNNING with the same state
    assert src.rollback() is MigState.RUNNING
    assert kernel_state(src) is MigState.RUNNING
    assert src_uart.snapshot() == src_before


def test_hooks_out_of_order_are_refused_before_any_ioctl(src: V2Driver) -> None:
    with pytest.raises(HookOrderError) as ei:
        src.load_state(b"\0" * 24)
    assert "load_state" in str(ei.value) and "IDLE" in str(ei.value)
    with pytest.raises(HookOrderError):
        src.save_live_complete_precopy(Chunks())
    with pytest.raises(ValueError, match="max_bytes"):
        src.save_setup()
        src.save_live_iterate(Chunks(), 0)
    assert src.rollback() is MigState.RUNNING
    assert kernel_state(src) is MigState.RUNNING


def test_check_state_names_what_differs(src: V2Driver, dst: V2Driver) -> None:
    dst.check_state(src.save_state())          # two mtty-2: the same identity
    no_precopy = encode_record(src.device.name, "v2",
                               v.VFIO_MIGRATION_STOP_COPY | v.VFIO_MIGRATION_P2P)
    with pytest.raises(DeviceMismatch) as ei:
        dst.check_state(no_precopy)
    assert ei.value.reasons == [
        f"flags: source {src.device.name} has 0x3, destination {dst.device.name} has 0x7"]
    assert kernel_state(dst) is MigState.RUNNING


def test_device_reopened_in_stop_saves_without_precopy(kernel: LinuxKernel, paths: HostPaths,
                                                       mtty_uuid: str) -> None:
    """6.12's mtty keeps its migration state across close (docs/kernel-contract.md §6.3 says close
    returns to RUNNING): the driver must read the state back, not assume RUNNING, and
    from STOP save with stop-copy only (PRE_COPY would start the device)."""
    first = open_device(kernel, paths, mtty_uuid)
    try:
        first.device.set_mig_state(MigState.STOP)
    finally:
        first.container.close()             # no reset: leave it in STOP
    o = open_device(kernel, paths, mtty_uuid)
    try:
        assert o.device.get_mig_state() is MigState.STOP
        d = v2(o.device)
        assert d.state() is MigState.STOP
        d.save_setup()
        assert kernel_state(d) is MigState.STOP     # still stopped: no pre-copy session
        assert d.save_live_pending() == Pending(0, MTTY2_BYTES, True)
        assert d.save_live_iterate(Chunks(), 1 << 20) == 0
        out = Chunks()
        assert d.save_live_complete_precopy(out) == MTTY2_BYTES     # STOP -> STOP_COPY
        assert out.data[:8] == (0x7E9D09898C3E2C4E).to_bytes(8, "little")
        assert kernel_state(d) is MigState.STOP_COPY
        d.cleanup()
        assert kernel_state(d) is MigState.STOP
    finally:
        close_migratable(o)
