"""A fault at every hook of both protocols (docs/architecture.md §1.6): the seed's hooks
(save_setup, save_live_pending, save_live_iterate, save_state, quiesce_p2p,
save_live_complete_precopy on the source; load_setup, load_state, load_complete, resume
on the destination; cleanup) each fail once, on a v1 device and on a v2 device.

Where the hook makes a kernel call, the fault is the simulator's (``FaultInjector``
points: ``transition:A->B``, ``v1:<bits>``, ``read:data_fd``, ``feature:<NAME>`` ...),
errno EINVAL so the recovery ladder can work. Where the protocol's hook makes no kernel
call that can fail (v1 register reads, ``save_state`` which only encodes a record, v1
``load_complete`` and ``cleanup``), the hook itself raises (a driver proxy).

Before the commit every failure rolls the source back (devices RUNNING, tracking stopped,
RAM untouched, no fd leaked) and the destination discards. A failed source ``cleanup``
comes after the destination resumed: the migration stands, verified, with a warning.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
from pathlib import Path
from typing import Any

import pytest

from tests.support.session_rig import (
    MiB,
    Side,
    SideContainer,
    assert_migrated,
    assert_rolled_back,
    build_side,
    migrate,
    pair,
    spec,
)
from vfiod.errors import KernelError
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import SessionConfig

DEVICES = {"v1": spec("v1_log"), "v2": spec("v2_precopy_p2p_log")}

#: (hook, protocol) -> (side, kernel fault point[, errno]) or (side, None): raise in the hook
FAULTS: dict[tuple[str, str], tuple[Any, ...]] = {
    ("save_setup", "v1"): ("src", "v1:SAVING|RUNNING"),
    ("save_setup", "v2"): ("src", "transition:RUNNING->PRE_COPY"),
    ("save_live_pending", "v1"): ("src", None),
    # EINVAL/ENOTTY here mean "no size estimate" (5.18-6.1), which the driver tolerates
    ("save_live_pending", "v2"): ("src", "feature:MIG_DATA_SIZE", errno.EIO),
    ("save_live_iterate", "v1"): ("src", "v1:read_data"),
    ("save_live_iterate", "v2"): ("src", "read:data_fd"),
    ("save_state", "v1"): ("src", None),
    ("save_state", "v2"): ("src", None),
    ("quiesce_p2p", "v2"): ("src", "transition:PRE_COPY->PRE_COPY_P2P"),
    ("save_live_complete_precopy", "v1"): ("src", "v1:SAVING"),
    ("save_live_complete_precopy", "v2"): ("src", "transition:PRE_COPY_P2P->STOP_COPY"),
    ("load_setup", "v1"): ("dst", "v1:RESUMING"),
    ("load_setup", "v2"): ("dst", "transition:STOP->RESUMING"),
    ("load_state", "v1"): ("dst", "v1:write_data"),
    ("load_state", "v2"): ("dst", "write:data_fd"),
    ("load_complete", "v1"): ("dst", None),
    ("load_complete", "v2"): ("dst", "transition:RESUMING->STOP"),
    ("resume", "v1"): ("dst", "v1:RUNNING"),
    ("resume", "v2"): ("dst", "transition:STOP->RUNNING_P2P"),
    ("cleanup", "v1"): ("src", None),
    ("cleanup", "v2"): ("src", "transition:STOP_COPY->STOP"),
}


class FailingHook:
    """A migration driver whose ``hook`` raises once (EIO), otherwise the real one."""

    def __init__(self, inner: Any, hook: str) -> None:
        self._inner = inner
        self._hook = hook
        self.hits = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name != self._hook or self.hits:
            return attr

        @functools.wraps(attr)            # the session names a hook by its method's name
        def fail(*a: Any, **k: Any) -> Any:
            self.hits += 1
            raise KernelError(errno.EIO, f"{name} (injected)", self._inner.device_name)
        return fail


@pytest.mark.parametrize("hook,proto", list(FAULTS), ids=[f"{h}-{p}" for h, p in FAULTS])
def test_fault_at_every_hook(tmp_path: Path, hook: str, proto: str) -> None:
    dev = DEVICES[proto]
    src, dst = pair(tmp_path, [SideContainer([dev])], fill_bytes=2 * MiB)
    try:
        side_name, point, *err = FAULTS[(hook, proto)]
        side: Side = src if side_name == "src" else dst
        gdev = side.guest.devices[0]
        proxy = None
        if point is None:
            proxy = gdev.driver = FailingHook(gdev.driver, hook)
        else:
            fault = side.kernel.faults.inject(point, err[0] if err else errno.EINVAL)
        ram_before = src.ram_digest()
        cfg = SessionConfig(policy=Policy(downtime_limit_s=1e-9, max_iterations=2,
                                          on_timeout="force"))
        run = migrate(src, dst, cfg)
        hits = proxy.hits if proxy is not None else fault.hits
        assert hits == 1, f"the fault at {point or hook} was never reached"
        if hook == "cleanup":
            assert_migrated(src, dst, run)
            assert any("cleanup" in w for w in run.source.warnings), run.source.warnings
            return
        assert run.source.result == "failed", run.source
        where = run.source if side_name == "src" else run.dest
        assert where is not None and where.failed_hook == f"{hook} on {gdev.name}"
        assert_rolled_back(src, dst, run, ram_before)
        assert run.source.rollback and all(v["state"] == "RUNNING"
                                           for v in run.source.rollback.values())
    finally:
        src.close()
        dst.close()


def test_device_error_state_is_reset_on_rollback(tmp_path: Path) -> None:
    """EIO on an arc puts the simulated device in ERROR: rollback resets it (the last rung
    of the ladder) and says so; the device runs again, its state back to power-on."""
    dev = DEVICES["v2"]
    src, dst = pair(tmp_path, [SideContainer([dev])], fill_bytes=1 * MiB)
    try:
        src.kernel.faults.inject("transition:PRE_COPY_P2P->STOP_COPY", errno.EIO)
        before = src.ram_digest()
        run = migrate(src, dst, SessionConfig(policy=Policy(downtime_limit_s=1e-9,
                                                            max_iterations=1,
                                                            on_timeout="force")))
        assert_rolled_back(src, dst, run, before)
        # the failed SET STOP_COPY ran the ladder: read back ERROR, reset, RUNNING
        assert "read back: ERROR" in run.source.reason
        assert "VFIO_DEVICE_RESET: ok" in run.source.reason
        assert any(e.startswith("ioctl:VFIO_DEVICE_RESET") for e in src.kernel.faults.log)
    finally:
        src.close()
        dst.close()


def test_destination_device_refuses_the_state(tmp_path: Path) -> None:
    """Same kind on paper (vendor, device, driver, flags: preflight and check_state pass)
    but another firmware with a different state size: the destination's kernel driver
    rejects the stream (a write or RESUMING -> STOP fails); the source rolls back and the
    destination resets the device, so nothing it loaded runs."""
    dev = DEVICES["v2"]
    src = build_side(tmp_path / "src", "hostA", [SideContainer([dev])], fill_bytes=1 * MiB)
    other = dataclasses.replace(dev, name="0000:8f:00.1", seed=5,
                                state_size=dev.state_size * 2)
    dst = build_side(tmp_path / "dst", "hostB", [SideContainer([other])])
    try:
        before = src.ram_digest()
        run = migrate(src, dst)
        assert run.dest is not None and run.dest.failed_hook is not None
        assert run.dest.failed_hook.split()[0] in ("load_state", "load_complete")
        assert_rolled_back(src, dst, run, before)
        # both ends report their rollback alike: final state and the rungs it took
        [back] = run.dest.rollback.values()
        assert back["state"] == "RUNNING" and "VFIO_DEVICE_RESET: ok" in back["rungs"], back
        assert all(v["state"] == "RUNNING" and "rungs" in v
                   for v in run.source.rollback.values())
    finally:
        src.close()
        dst.close()
