"""Faults injected at exact transitions, data-fd reads/writes and v1 state writes end with the
source RUNNING (reset where the device went to ERROR) and an error that names the
operation, the device, the errno and every recovery rung (docs/architecture.md §1.6, §2 "Errors";
docs/kernel-contract.md §5.4, §6.3, §11.2)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.sim.test_driver_migrate import DEST_PATH, SOURCE_PATH
from tests.support.driver_rig import (
    CAPS,
    PathRecorder,
    Side,
    collect,
    load,
    pair,
    record_paths,
    save,
    spec_for,
)
from vfiod.errors import KernelError
from vfiod.migration.device.errors import DeviceTransitionError
from vfiod.migration.states import MigState

V2 = [c for c in CAPS if c != "v1"]


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch):
    rec = record_paths(monkeypatch)
    yield rec
    assert rec.forbidden() == [], "a STOP_COPY -> PRE_COPY request reached the kernel"


@pytest.fixture
def src(tmp_path: Path, request: pytest.FixtureRequest):
    side = Side.build(tmp_path, spec_for(request.param))
    yield side
    side.close()


def _run_source(side: Side) -> None:
    s = side.drivers[0] if side.drivers else side.driver()
    save(side, s)
    s.cleanup()


def _source_points(cap: str) -> list[str]:
    return [p if p.startswith("v1:") else f"transition:{p}" for p in SOURCE_PATH[cap]]


def _cases() -> list[tuple[str, str, int]]:
    return [(cap, point, err) for cap in CAPS for point in _source_points(cap)
            for err in (errno.EIO, errno.EAGAIN)]


@pytest.mark.parametrize("src,point,err", _cases(), indirect=["src"],
                         ids=lambda x: errno.errorcode[x] if isinstance(x, int) else str(x))
def test_source_state_fault_ends_running(src: Side, paths: PathRecorder, point: str,
                                         err: int) -> None:
    src.faults.inject(point, err)
    s = src.driver()
    with pytest.raises(DeviceTransitionError) as ei:
        _run_source(src)
    e = ei.value
    assert e.errno == err and e.target == src.name
    msg = str(e)
    assert f"on {src.name}: {errno.errorcode[err]}" in msg
    assert "read back: " in msg
    if s.protocol == "v2":
        assert msg.startswith("VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE ")
    else:
        assert msg.startswith("v1 write device_state=")
    went_to_error = err == errno.EIO          # the simulator's rule: EIO = device lost
    last_arc = point == _source_points(_cap_of(src))[-1]
    if went_to_error:
        assert "ERROR" in msg and "VFIO_DEVICE_RESET: ok" in msg and e.reset
        # nothing is requested of a device in ERROR (EINVAL + kernel WARN): straight to reset
        assert "(recovery)" not in msg
    if went_to_error or last_arc:              # no recovery state after the stream ended
        assert src.resets() == 1 and e.final is MigState.RUNNING
    else:
        assert not e.reset and src.resets() == 0
        assert e.final is MigState.RUNNING
        assert "(recovery): ok" in msg or "already in recovery state RUNNING" in msg
    assert s.rollback() is MigState.RUNNING
    assert src.kernel_state() is MigState.RUNNING and src.data_fds() == []


def _cap_of(side: Side) -> str:
    for cap in CAPS:
        if spec_for(cap).name == side.name:
            return cap
    raise AssertionError(side.name)


@pytest.mark.parametrize("src", V2, indirect=True)
def test_recovery_rung_fails_then_reset(src: Side, paths: PathRecorder) -> None:
    cap = _cap_of(src)
    s = src.driver()
    s.save_setup()
    if s.has_p2p:
        s.quiesce_p2p()
    # the stop-copy arc fails without losing the device, and so does the way back
    first = {"v2_stop_copy": "STOP->STOP_COPY", "v2_p2p": "STOP->STOP_COPY",
             "v2_precopy": "PRE_COPY->STOP_COPY", "v2_precopy_p2p": "PRE_COPY_P2P->STOP_COPY"}
    back = {"v2_stop_copy": "STOP->RUNNING", "v2_p2p": "STOP->RUNNING_P2P",
            "v2_precopy": "PRE_COPY->RUNNING", "v2_precopy_p2p": "PRE_COPY_P2P->RUNNING_P2P"}
    src.faults.inject(f"transition:{first[cap]}", errno.EBUSY)
    src.faults.inject(f"transition:{back[cap]}", errno.EBUSY)
    with pytest.raises(DeviceTransitionError) as ei:
        s.save_live_complete_precopy(lambda c: None)
    e = ei.value
    assert e.errno == errno.EBUSY and e.reset and e.final is MigState.RUNNING
    rungs = " | ".join(e.rungs)
    assert "SET STOP_COPY: EBUSY" in rungs and "SET RUNNING (recovery): EBUSY" in rungs
    assert rungs.endswith("VFIO_DEVICE_RESET: ok | now RUNNING")
    assert src.kernel_state() is MigState.RUNNING and src.data_fds() == []
    assert s.rollback() is MigState.RUNNING


@pytest.mark.parametrize("src", ["v2_precopy_p2p"], indirect=True)
def test_reset_failing_too_is_reported_and_a_later_rollback_recovers(
        src: Side, paths: PathRecorder) -> None:
    s = src.driver()
    s.save_setup()
    src.faults.inject("transition:PRE_COPY->PRE_COPY_P2P", errno.EIO)
    src.faults.inject("ioctl:VFIO_DEVICE_RESET", errno.EIO)
    with pytest.raises(DeviceTransitionError) as ei:
        s.quiesce_p2p()
    e = ei.value
    assert "VFIO_DEVICE_RESET: EIO" in e.rungs and e.final is MigState.ERROR
    assert s.state() is MigState.ERROR and src.kernel_state() is MigState.ERROR
    assert s.rollback() is MigState.RUNNING           # the reset works the second time
    assert src.kernel_state() is MigState.RUNNING and src.data_fds() == []


@pytest.mark.parametrize("src", ["v2_precopy", "v2_precopy_p2p"], indirect=True)
def test_precopy_read_fault(src: Side, paths: PathRecorder) -> None:
    s = src.driver()
    s.save_setup()
    src.faults.inject("read:data_fd", errno.EIO, skip=1)
    got: list[bytes] = []
    with pytest.raises(KernelError) as ei:
        s.save_live_iterate(collect(got), 1 << 20)
    assert str(ei.value).startswith(f"read(migration data fd) on {src.name}: EIO")
    assert len(got) == 1                                   # the first read went through
    assert s.rollback() is MigState.RUNNING
    assert src.kernel_state() is MigState.RUNNING and src.resets() == 0
    assert src.data_fds() == []


@pytest.mark.parametrize("src", ["v2_precopy"], indirect=True)
def test_enomsg_from_a_precopy_read_is_not_an_error(src: Side) -> None:
    s = src.driver()
    s.save_setup()
    src.faults.inject("read:data_fd", errno.ENOMSG)
    assert s.save_live_iterate(lambda c: None, 1 << 20) == 0
    assert s.save_live_iterate(lambda c: None, 1 << 20) > 0
    s.rollback()


@pytest.mark.parametrize("src", V2, indirect=True)
def test_stop_copy_read_fault(src: Side, paths: PathRecorder) -> None:
    s = src.driver()
    s.save_setup()
    while s.save_live_iterate(lambda c: None, 1 << 20):
        pass
    src.faults.inject("read:data_fd", errno.EIO)
    with pytest.raises(KernelError, match=r"read\(migration data fd\) on .*: EIO"):
        s.save_live_complete_precopy(lambda c: None)
    assert s.state() is MigState.STOP_COPY
    assert s.rollback() is MigState.RUNNING            # STOP_COPY -> STOP -> RUNNING
    assert src.kernel_state() is MigState.RUNNING and src.data_fds() == []


@pytest.mark.parametrize("src", ["v1"], indirect=True)
@pytest.mark.parametrize("when", ["precopy", "stopcopy"])
def test_v1_data_fault(src: Side, when: str) -> None:
    s = src.driver()
    s.save_setup()
    if when == "stopcopy":
        while s.save_live_iterate(lambda c: None, 1 << 20):
            pass
    src.faults.inject("v1:read_data", errno.EIO)
    with pytest.raises(KernelError, match=r"v1 read data_offset on .*: EIO"):
        if when == "precopy":
            s.save_live_iterate(lambda c: None, 1 << 20)
        else:
            s.save_live_complete_precopy(lambda c: None)
    assert s.rollback() is MigState.RUNNING
    assert src.kernel_state() is MigState.RUNNING


def _dest_cases() -> list[tuple[str, str, int]]:
    out = []
    for cap in CAPS:
        for p in DEST_PATH[cap]:
            out.append((cap, p if p.startswith("v1:") else f"transition:{p}", errno.EIO))
        out.append((cap, "v1:write_data" if cap == "v1" else "write:data_fd", errno.EIO))
    out.append(("v2_precopy", "transition:RESUMING->STOP", errno.EINVAL))
    return out


@pytest.mark.parametrize("cap,point,err", _dest_cases())
def test_destination_fault_discards_and_runs(tmp_path: Path, paths: PathRecorder, cap: str,
                                             point: str, err: int) -> None:
    src, dst = pair(tmp_path, cap)
    try:
        s, d = src.driver(), dst.driver()
        record, chunks = save(src, s)
        dst.faults.inject(point, err)
        with pytest.raises(KernelError) as ei:
            load(d, record, chunks)
        assert ei.value.errno == err and dst.name in str(ei.value)
        assert d.rollback() is MigState.RUNNING
        assert dst.kernel_state() is MigState.RUNNING and dst.data_fds() == []
        assert dst.model != src.model
        assert s.rollback() is MigState.RUNNING           # the source takes over again
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("cap", CAPS)
def test_corrupt_stream_is_refused_and_discarded(tmp_path: Path, paths: PathRecorder,
                                                 cap: str) -> None:
    src, dst = pair(tmp_path, cap)
    try:
        s, d = src.driver(), dst.driver()
        record, chunks = save(src, s)
        bad = bytearray(chunks[0])
        bad[0] ^= 0xFF                                     # the stream header's first byte
        chunks[0] = bytes(bad)
        with pytest.raises(KernelError) as ei:
            load(d, record, chunks)
        assert dst.name in str(ei.value)
        assert d.rollback() is MigState.RUNNING
        assert dst.kernel_state() is MigState.RUNNING and dst.resets() >= 1
        assert dst.model != src.model
    finally:
        src.close()
        dst.close()
