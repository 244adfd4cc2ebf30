"""Failure injection on our own test device (native/vfiod_dma/README.md "Control
interface", ``fail_arc``): a migration whose device fails one arc of the v2 state machine,
with an errno or by going to ERROR, fails (a failed source cancels the destination) and
ends with both devices RUNNING, the source guest running and no device state changed (docs/architecture.md §1 steps 5-6; the recovery ladder of
docs/kernel-contract.md §6.3: SET target, GET, SET recovery, VFIO_DEVICE_RESET).

Each case is a whole migration through vfiod's session over loopback TCP, with a small
device state so the case stays quick under emulation.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from tests.kernel.guest.native_dma import DmaControl
from tests.kernel.guest.test_migration_session import Side, migrate_tcp, side_pair
from vfiod.kernel.linux import LinuxKernel
from vfiod.migration.planning.hostfacts import HostFacts
from vfiod.migration.states import GuestState, MigState
from vfiod.vfio import HostPaths

S = MigState
#: (side, arc, errno or None for ERROR): the arcs vfiod's session takes on each side
CASES = [
    ("source", (S.RUNNING, S.PRE_COPY), errno.ENOMEM),
    ("source", (S.PRE_COPY, S.PRE_COPY_P2P), None),
    ("source", (S.PRE_COPY_P2P, S.STOP_COPY), errno.EIO),
    ("destination", (S.STOP, S.RESUMING), errno.ENOSPC),
    ("destination", (S.RESUMING, S.STOP), None),
]


@pytest.fixture
def fault_sides(kernel: LinuxKernel, paths: HostPaths, native_dma_pair: tuple[str, str],
                host_facts: HostFacts) -> Iterator[tuple[Side, Side]]:
    with side_pair(kernel, paths, ("vm-fault-src", "vm-fault-dst"), native_dma_pair,
                   host_facts) as (src, dst):
        try:
            yield src, dst
        finally:                    # disarmed before the guests close their devices
            for side in (src, dst):
                DmaControl(side.dev.name).fail_arc(None)


@pytest.mark.parametrize(("side", "arc", "err"), CASES,
                         ids=[f"{s}-{a[0].name}-{a[1].name}-{'ERROR' if e is None else e}"
                              for s, a, e in CASES])
def test_native_dma_failed_arc_leaves_both_sides_running(
        fault_sides: tuple[Side, Side], side: str, arc: tuple[MigState, MigState],
        err: int | None, numba_cache: None) -> None:
    src, dst = fault_sides
    sctl, dctl = DmaControl(src.dev.name), DmaControl(dst.dev.name)
    sctl.state_size = 256 * 1024
    sctl.fill(seed=21)
    dctl.state_size = 64 * 1024
    dctl.fill(seed=22)
    src_sum, dst_sum = sctl.checksum(), dctl.checksum()
    src_ram = src.ram()
    faulty = sctl if side == "source" else dctl
    faulty.fail_arc(arc, err)

    run = migrate_tcp(src, dst)
    assert faulty.armed_failure() == "none", "the injected failure never fired"
    # the failing side fails; a failed source tells the destination to cancel
    results = ("failed", "cancelled") if side == "source" else ("failed", "failed")
    assert (run.source.result, run.dest.result) == results, (
        run.source.reason, run.dest.reason)
    failed = run.source if side == "source" else run.dest
    want = "EIO" if err is None else errno.errorcode[err]
    assert want in failed.reason, failed.reason
    if err is None:             # ERROR is left only by a reset: the ladder's last rung
        assert "VFIO_DEVICE_RESET: ok" in failed.reason, failed.reason

    # both devices run again, each with the state it had; the source guest runs on
    for s, ctl, before in ((src, sctl, src_sum), (dst, dctl, dst_sum)):
        assert s.dev.device.get_mig_state() is MigState.RUNNING, s.guest.name
        assert ctl.mig_state() == MigState.RUNNING
        assert ctl.checksum() == before, s.guest.name
    assert src.guest.run_state is GuestState.RUNNING
    assert src.ram() == src_ram
