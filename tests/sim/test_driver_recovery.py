"""The recovery sequence is one piece of code for both protocols (docs/architecture.md §1 step 6,
§1.6; docs/kernel-contract.md §5.4, §6.3, §11.2): the same fault at the same arc gives v1 and v2 the
same rungs, in the same order — in the ladder, in a reset, in the refusal to touch a device
in ERROR and in ``rollback_log``. Only the words differ (v1 "write" and its state bits,
v2 "SET"); ``neutral`` maps them to one vocabulary before comparing.

v1 and v2 with pre-copy walk the same states (RUNNING → PRE_COPY → STOP_COPY → STOP), so an
arc names the same step on both: ``ARC[cap][step]`` is its fault point.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.driver_rig import Side, pair, save, spec_for
from vfiod.errors import MigrationError
from vfiod.migration.device.errors import DeviceTransitionError
from vfiod.migration.device.protocol import HookPhase, MigrationDriver
from vfiod.migration.states import MigState

PROTOCOLS = ["v1", "v2_precopy"]
ARC = {
    "v1": {"stop_copy": "v1:SAVING", "run_from_stop": "v1:RUNNING"},
    "v2_precopy": {"stop_copy": "transition:PRE_COPY->STOP_COPY",
                   "run_from_stop": "transition:STOP->RUNNING"},
}
RESET = "ioctl:VFIO_DEVICE_RESET"


def neutral(rungs: list[str] | tuple[str, ...]) -> list[str]:
    """Rungs in v2's words: v1's "write X" is "SET X", its read backs drop the bits."""
    out = []
    for r in rungs:
        r = re.sub(r"^write ", "SET ", r)
        out.append(re.sub(r"^read back: 0b[01]{3} \([A-Z|]+\) ", "read back: ", r))
    return out


def _source(tmp_path: Path, cap: str) -> tuple[Side, MigrationDriver]:
    side = Side.build(tmp_path / cap, spec_for(cap))
    return side, side.driver()


def _stop_copy_lost_and_reset_fails(side: Side, s: MigrationDriver, cap: str) -> list[str]:
    """The stop-copy request loses the device (EIO: ERROR) and the reset fails too."""
    s.save_setup()
    side.faults.inject(ARC[cap]["stop_copy"], errno.EIO)
    side.faults.inject(RESET, errno.EIO)
    with pytest.raises(DeviceTransitionError) as ei:
        s.save_live_complete_precopy(lambda c: None)
    assert (ei.value.errno, ei.value.final, ei.value.reset) == (errno.EIO, MigState.ERROR, True)
    assert s.state() is MigState.ERROR and side.kernel_state() is MigState.ERROR
    return neutral(ei.value.rungs)


def scenario_ladder_reset_fails(side: Side, s: MigrationDriver, cap: str) -> list[list[str]]:
    """Ladder with a failing reset, then rollback resets from ERROR."""
    ladder = _stop_copy_lost_and_reset_fails(side, s, cap)
    assert s.rollback() is MigState.RUNNING
    return [ladder, neutral(s.rollback_log)]


def scenario_request_in_error(side: Side, s: MigrationDriver, cap: str) -> list[list[str]]:
    """A device left in ERROR is never asked for a state: it is reset instead."""
    ladder = _stop_copy_lost_and_reset_fails(side, s, cap)
    arcs = len(side.transitions())
    with pytest.raises(DeviceTransitionError) as ei:
        s.save_live_complete_precopy(lambda c: None)      # asks for STOP_COPY again
    assert len(side.transitions()) == arcs                 # nothing reached the kernel
    assert (ei.value.errno, ei.value.final, ei.value.reset) == (errno.EIO, MigState.RUNNING,
                                                                True)
    assert s.rollback() is MigState.RUNNING
    return [ladder, neutral(ei.value.rungs), neutral(s.rollback_log)]


def scenario_rollback_request_fails(side: Side, s: MigrationDriver, cap: str
                                    ) -> list[list[str]]:
    """A completed source (STOP) whose way back to RUNNING loses the device: reset."""
    s.save_setup()
    s.save_live_complete_precopy(lambda c: None)
    s.cleanup()
    assert side.kernel_state() is MigState.STOP
    side.faults.inject(ARC[cap]["run_from_stop"], errno.EIO)
    assert s.rollback() is MigState.RUNNING
    assert side.kernel_state() is MigState.RUNNING and side.resets() == 1
    return [neutral(s.rollback_log)]


def scenario_rollback_reset_fails(side: Side, s: MigrationDriver, cap: str
                                  ) -> list[list[str]]:
    """Rollback from ERROR whose reset fails: an error, the phase kept; a retry recovers."""
    _stop_copy_lost_and_reset_fails(side, s, cap)
    side.faults.inject(RESET, errno.EIO)
    with pytest.raises(DeviceTransitionError) as ei:
        s.rollback()
    e = ei.value
    assert (e.op, e.errno, e.final, e.reset) == ("rollback", errno.EIO, MigState.ERROR, True)
    assert s.phase is HookPhase.SAVING                     # rollback did not finish
    first = neutral(s.rollback_log)
    assert neutral(e.rungs) == first
    assert s.rollback() is MigState.RUNNING and s.phase is HookPhase.IDLE
    return [first, neutral(s.rollback_log)]


SCENARIOS: dict[str, tuple[Callable[[Side, MigrationDriver, str], list[list[str]]],
                           list[list[str]]]] = {
    "ladder_reset_fails": (scenario_ladder_reset_fails, [
        ["SET STOP_COPY: EIO", "read back: ERROR", "VFIO_DEVICE_RESET: EIO", "now ERROR"],
        ["read back: ERROR", "VFIO_DEVICE_RESET: ok", "now RUNNING"],
    ]),
    "request_in_error": (scenario_request_in_error, [
        ["SET STOP_COPY: EIO", "read back: ERROR", "VFIO_DEVICE_RESET: EIO", "now ERROR"],
        ["device is in ERROR: STOP_COPY not requested", "VFIO_DEVICE_RESET: ok",
         "now RUNNING"],
        ["read back: RUNNING"],
    ]),
    "rollback_request_fails": (scenario_rollback_request_fails, [
        ["read back: STOP", "SET RUNNING: EIO", "read back: ERROR", "VFIO_DEVICE_RESET: ok",
         "now RUNNING"],
    ]),
    "rollback_reset_fails": (scenario_rollback_reset_fails, [
        ["read back: ERROR", "VFIO_DEVICE_RESET: EIO", "now ERROR"],
        ["read back: ERROR", "VFIO_DEVICE_RESET: ok", "now RUNNING"],
    ]),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_fault_same_rungs_for_v1_and_v2(tmp_path: Path, name: str) -> None:
    run, expected = SCENARIOS[name]
    got: dict[str, list[list[str]]] = {}
    for cap in PROTOCOLS:
        side, s = _source(tmp_path, cap)
        try:
            got[cap] = run(side, s, cap)
            assert side.kernel_state() is MigState.RUNNING and side.data_fds() == []
        finally:
            side.close()
    assert got["v1"] == got["v2_precopy"] == expected


@pytest.mark.parametrize("cap", PROTOCOLS)
def test_destination_rollback_log_is_a_reset(tmp_path: Path, cap: str) -> None:
    src, dst = pair(tmp_path, cap)
    try:
        record, chunks = save(src, src.driver())
        d = dst.driver()
        d.check_state(record)
        d.load_setup()
        d.load_state(chunks[0])
        assert d.rollback() is MigState.RUNNING
        assert neutral(d.rollback_log) == ["read back: RESUMING", "VFIO_DEVICE_RESET: ok",
                                           "now RUNNING"]
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("cap", PROTOCOLS)
def test_rollback_log_keeps_the_protocols_words(tmp_path: Path, cap: str) -> None:
    side, s = _source(tmp_path, cap)
    try:
        s.save_setup()
        s.save_live_complete_precopy(lambda c: None)
        s.cleanup()
        assert s.rollback() is MigState.RUNNING
        want = {"v1": ["read back: 0b000 (STOP) STOP", "write RUNNING: ok"],
                "v2_precopy": ["read back: STOP", "SET RUNNING: ok"]}[cap]
        assert list(s.rollback_log) == want
    finally:
        side.close()


def test_v1_load_setup_only_from_running_or_stop(tmp_path: Path) -> None:
    side, s = _source(tmp_path, "v1")
    try:
        s.save_setup()                             # the device is in PRE_COPY now
        other = side.driver()                      # a second driver on the same device
        before = side.transitions()
        with pytest.raises(MigrationError, match="device is in PRE_COPY, expected RUNNING "
                                                 "or STOP"):
            other.load_setup()
        assert side.transitions() == before and other.phase is HookPhase.IDLE
        assert s.rollback() is MigState.RUNNING
    finally:
        side.close()
