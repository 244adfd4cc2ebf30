"""Observing never touches the device (docs/architecture.md §8.5): while another VMM
drives a device's migration on the simulated host, vfiod's observer reports each state
and opens nothing — no /dev/vfio node, no cdev, no device fd, no ioctl — and its reads
change nothing the VMM sees."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import vfiod.abi.vfio as v
from tests.support.sim_mig_rig import RigFactory, make_rigs, specs
from vfiod.daemon.config_observe import ObserveConfig
from vfiod.daemon.observe import ObservedDevices
from vfiod.kernel.sim import SimHost

S = v.MigState
DEVICE = "0000:3b:00.2"


@pytest.fixture
def rig(tmp_path: Path):  # noqa: ANN201
    yield from make_rigs(tmp_path)


def _observer(kernel: object) -> ObservedDevices:
    # max_age 0: every call reads debugfs anew, as a status after the cache expired
    return ObservedDevices([ObserveConfig(DEVICE, "vm7")], kernel,  # type: ignore[arg-type]
                           max_age_s=0.0)


def test_observer_follows_another_vmms_migration_without_opening_anything(
        rig: RigFactory) -> None:
    r = rig(dataclasses.replace(specs()["v2_precopy_p2p"], name=DEVICE))
    vmm = r[DEVICE]                     # the other VMM: it opened the device itself
    observer = _observer(r.kernel)
    opens, files = dict(r.kernel.node_opens), r.kernel.open_files()
    seen = []
    data_fd = vmm.set_state(S.PRE_COPY)
    for step in (S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY, S.STOP):
        if step != S.PRE_COPY:
            vmm.set_state(step)
        before = len(r.faults.log)
        row = observer.rows()[0]
        seen.append(row["state"])
        assert row["readable"] and row["owner"] == "vm7"
        # the observer's only kernel event is the debugfs read: no ioctl, no open
        assert r.faults.log[before:] == [f"debugfs:state@{DEVICE}"]
        assert vmm.get_state() == step            # reading changed nothing for the VMM
    assert seen == ["PRE_COPY", "PRE_COPY_P2P", "STOP_COPY", "STOP"]
    r.kernel.close(data_fd)
    assert dict(r.kernel.node_opens) == opens
    assert set(r.kernel.open_files()) == set(files) - {data_fd}
    assert r.host.device(DEVICE).open_count == 1        # the VMM's fd, nobody else's


def test_an_unopened_device_stays_unopened_and_running(tmp_path: Path) -> None:
    host = SimHost.build(tmp_path, [[dataclasses.replace(specs()["v2_p2p"], name=DEVICE)]])
    observer = _observer(host.kernel)
    for _ in range(20):
        assert observer.rows()[0]["state"] == "RUNNING"
    assert host.kernel.debugfs.reads == 20
    assert not host.kernel.node_opens and not host.kernel.open_files()
    assert host.device(DEVICE).open_count == 0
    assert host.kernel.faults.log == [f"debugfs:state@{DEVICE}"] * 20
