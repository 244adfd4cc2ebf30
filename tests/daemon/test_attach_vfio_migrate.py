"""A guest whose RAM and device fds its VMM handed over migrates between two daemons
(docs/architecture.md §8.1), on the sim backend with both daemons in-process
(tests/support/sim_vmm.py): the destination VMM's device holds the source device's state
and its RAM the source RAM; the source VMM's device fd still answers after vfiod let go.
A failed switchover rolls the device back, and the recovery ladder ends in a reset only
if the attach said ``allow_reset: true``; otherwise it stops before the reset and the
migration's error says the device needs its VMM.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemons import wait_until
from tests.support.sim_vmm import SimVmm, call, hand_over, sim_daemon_in_process, vmms_closed
from tests.support.vmm_ram import memfd_fds
from vfiod.daemon.lifecycle import LifecycleState
from vfiod.daemon.main import Daemon
from vfiod.migration.states import MigState

MIB = 1 << 20
SRC_DEV, DST_DEV = "0000:3b:00.1", "0000:81:00.1"
STOP_COPY_FAULT = "transition:PRE_COPY_P2P->STOP_COPY"   # the device ends in ERROR


def _config(dev: str, start: str) -> str:
    listen = '[migration]\nlisten = "127.0.0.1:0"\n' if start == "incoming" else ""
    return listen + f'''
[[guest]]
name = "vm"
start = "{start}"
[[guest.ram]]
name = "ram"
size = "8MiB"
from = "vmm"
[[guest.device]]
name = "{dev}"
id = "nic0"
from = "vmm"

[sim]
[[sim.device]]
name = "{dev}"
capability = "v2_precopy_p2p_log"
'''


@pytest.fixture()
def pair(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    with sim_daemon_in_process(tmp_path / "src", _config(SRC_DEV, "running")) as src, \
            sim_daemon_in_process(tmp_path / "dst", _config(DST_DEV, "incoming")) as dst:
        yield src, dst


def _migration(d: Daemon) -> dict:
    return call(d, "status", {"guest": "vm"})["guests"][0]["migration"] or {}


def _migrate(src: Daemon, dst: Daemon) -> dict:
    assert dst.info.migration_listen is not None
    call(src, "migrate", {"guest": "vm", "to": dst.info.migration_listen})
    wait_until(lambda: _migration(src).get("result") is not None, 60, "the migration to end")
    return _migration(src)


def _kernel_state(d: Daemon, name: str) -> MigState:
    """The device state as the simulated kernel holds it (what the VMM's fd sees)."""
    node = d._sim.device(name)
    return next(MigState(p.state) for p in node.parts.features if hasattr(p, "arcs"))


def _held_at_defined(d: Daemon, label: str) -> list[tuple[set[int], int]]:
    """Filled, each time ``d`` records the guest ``defined``, with what ``d`` still held of
    its VMM's (call it once the VMM is open, before the attach): its kernel's fds beyond
    the VMM's own, and the fds on the VMM's RAM memfd ``label`` beyond the VMM's. A VMM
    reading ``defined`` may take its RAM back at once, so vfiod's copies must be closed
    by then (docs/architecture.md §8.1)."""
    files, ram = set(d.kernel.open_files()), len(memfd_fds(os.getpid(), label))
    seen: list[tuple[set[int], int]] = []
    lifecycle = d.registry.lifecycle
    real_move = lifecycle.move

    def move(guest: str, to: LifecycleState, *args: Any, **kwargs: Any) -> Any:
        if to is LifecycleState.DEFINED:
            seen.append((set(d.kernel.open_files()) - files,
                         len(memfd_fds(os.getpid(), label)) - ram))
        return real_move(guest, to, *args, **kwargs)
    lifecycle.move = move                               # type: ignore[method-assign]
    return seen


def _state(d: Daemon) -> str:
    return call(d, "status", {"guest": "vm"})["guests"][0]["state"]


def test_handed_over_devices_and_ram_migrate(pair) -> None:
    src, dst = pair
    svmm = SimVmm(src, [SRC_DEV], 8 * MIB, "vmm-src")
    dvmm = SimVmm(dst, [DST_DEV], 8 * MIB, "vmm-dst")
    with vmms_closed(svmm, dvmm):
        released = _held_at_defined(src, "vmm-src")
        svmm.ram.view()[4096:4096 + 11] = b"guest bytes"
        assert hand_over(src, svmm.request("vm"), svmm.fds())["state"] == "running"
        assert hand_over(dst, dvmm.request("vm"), dvmm.fds())["state"] == "incoming"
        m = _migrate(src, dst)
        assert m["result"] == "completed", m
        wait_until(lambda: _state(dst) == "running", 30, "vm to run on the destination")
        assert bytes(dvmm.ram.view()) == bytes(svmm.ram.view())
        assert m["verified"] is True, m
        # the device the destination VMM holds runs the loaded state; the source's stopped
        assert _kernel_state(dst, DST_DEV) is MigState.RUNNING
        assert _kernel_state(src, SRC_DEV) is MigState.STOP
        # the source let go of its copies (a VMM's guest is released, not re-opened) and
        # the source VMM's device fd still answers
        wait_until(lambda: _state(src) == "defined", 30, "vm released on the source")
        assert released == [(set(), 0)]    # its copies were closed when it read defined
        assert svmm.devices[SRC_DEV].info().num_regions > 0
        assert call(dst, "detach", {"guest": "vm"})["state"] == "defined"


@pytest.mark.parametrize("allow_reset", [False, True], ids=["no_reset", "reset_allowed"])
def test_the_rollback_resets_a_vmm_device_only_if_allowed(pair, allow_reset) -> None:
    src, dst = pair
    svmm = SimVmm(src, [SRC_DEV], 8 * MIB, "vmm-src")
    dvmm = SimVmm(dst, [DST_DEV], 8 * MIB, "vmm-dst")
    discarded = _held_at_defined(dst, "vmm-dst")
    with vmms_closed(svmm, dvmm):
        hand_over(src, svmm.request("vm", allow_reset=allow_reset), svmm.fds())
        hand_over(dst, dvmm.request("vm"), dvmm.fds())
        faults = src.kernel.faults            # the device fails its stop-copy (ERROR)
        faults.inject(STOP_COPY_FAULT, errno.EIO)
        m = _migrate(src, dst)
        assert m["result"] == "failed", m
        resets = sum(1 for e in faults.log if e.startswith("ioctl:VFIO_DEVICE_RESET"))
        if allow_reset:
            assert resets == 1 and _kernel_state(src, SRC_DEV) is MigState.RUNNING, m
        else:
            assert resets == 0 and _kernel_state(src, SRC_DEV) is MigState.ERROR, m
            assert "the device needs its VMM" in str(m), m
            # status says so beside a guest that runs on: not only the migration's error
            assert any(w.startswith(f"device {SRC_DEV} is ") and "needs its VMM" in w
                       and "after the rollback" in w for w in m["warnings"]), m
        # the source runs on (rolled back as far as allowed); the destination drops what
        # it received and releases the guest (its VMM attaches again to retry) on its own
        # thread, which may still run when the source's result is in
        assert _state(src) == "running"
        wait_until(lambda: _state(dst) == "defined", 30, "the destination to release vm")
        assert discarded == [(set(), 0)]   # its copies were closed when it read defined
        assert call(src, "detach", {"guest": "vm"})["state"] == "defined"
