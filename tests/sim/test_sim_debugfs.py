"""The simulated kernel's debugfs (vfiod/kernel/sim/debugfs.py, docs/kernel-contract.md
§12): the kernel's tree, strings and errno values, served from live device state."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest

import vfiod.abi.vfio as v
from tests.support.sim_mig_rig import RigFactory, make_rigs, specs
from vfiod.errors import KernelError
from vfiod.kernel.linux import LinuxKernel
from vfiod.kernel.sim import HostDevice, SimHost, SimHostConfig
from vfiod.kernel.sim.debugfs import DEBUGFS_MODES

S = v.MigState
V2 = "0000:3b:00.2"
PLAIN = "0000:3b:00.3"
V1 = "0000:3b:00.4"
HOSTDEV = "0000:3b:00.0"


@pytest.fixture
def rig(tmp_path: Path):  # noqa: ANN201
    yield from make_rigs(tmp_path)


def _host(tmp_path: Path, mode: str = "vfio") -> SimHost:
    caps = specs()
    devices = [dataclasses.replace(caps["v2_precopy_p2p"], name=V2),
               dataclasses.replace(caps["not_migratable"], name=PLAIN),
               dataclasses.replace(caps["v1"], name=V1)]
    return SimHost.build(tmp_path / "host", [[d] for d in devices] + [[HostDevice(HOSTDEV)]],
                         config=SimHostConfig(debugfs=mode))


def _errno(call, *args: str) -> int:  # noqa: ANN001
    with pytest.raises(KernelError) as e:
        call(*args)
    return int(e.value.errno)


def test_tree_has_every_vfio_device_and_state_only_with_v2_migration_ops(tmp_path: Path) -> None:
    k = _host(tmp_path).kernel
    assert "vfio" in k.list_debugfs("") and len(k.list_debugfs("")) > 1
    # registered VFIO devices only: a device bound to a host driver has no directory
    assert k.list_debugfs("vfio") == sorted([V2, PLAIN, V1])
    assert k.list_debugfs(f"vfio/{V2}") == ["migration"]
    assert k.list_debugfs(f"vfio/{V2}/migration") == ["state"]
    assert k.read_debugfs(f"vfio/{V2}/migration/state") == "RUNNING\n"
    # no mig_ops: the kernel creates the device directory and nothing in it
    for name in (PLAIN, V1):
        assert k.list_debugfs(f"vfio/{name}") == []
        assert _errno(k.read_debugfs, f"vfio/{name}/migration/state") == errno.ENOENT
    assert _errno(k.read_debugfs, f"vfio/{HOSTDEV}/migration/state") == errno.ENOENT
    assert _errno(k.read_debugfs, f"vfio/{V2}/migration") == errno.EISDIR
    assert _errno(k.list_debugfs, f"vfio/{V2}/migration/state") == errno.ENOTDIR


def test_state_text_follows_the_device_as_its_owner_drives_it(rig: RigFactory) -> None:
    r = rig(specs()["v2_precopy_p2p"])
    dev = next(iter(r.devs.values()))
    path = f"vfio/{dev.spec.name}/migration/state"
    fds = []
    for state in (S.RUNNING_P2P, S.PRE_COPY_P2P, S.PRE_COPY, S.STOP_COPY, S.STOP,
                  S.RESUMING):
        fds.append(dev.set_state(state))
        assert r.kernel.read_debugfs(path) == f"{state.name}\n"
    dev.reset()                      # RESUMING with no stream: only a reset leaves it
    for fd in fds:
        if fd >= 0:
            r.kernel.close(fd)
    assert r.kernel.read_debugfs(path) == "RUNNING\n"
    r.faults.inject("transition:RUNNING->RUNNING_P2P", errno.EIO)   # driver lost it
    with pytest.raises(KernelError):
        dev.set_state(S.STOP)
    assert r.kernel.read_debugfs(path) == "ERROR\n"


def test_a_value_outside_the_enum_reads_invalid(tmp_path: Path) -> None:
    k = _host(tmp_path).kernel
    k.debugfs.register("0000:3b:00.7", lambda: 99)
    assert k.read_debugfs("vfio/0000:3b:00.7/migration/state") == "Invalid\n"


@pytest.mark.parametrize("mode", DEBUGFS_MODES)
def test_modes_answer_with_the_kernels_errno(tmp_path: Path, mode: str) -> None:
    k = _host(tmp_path, mode).kernel
    path = f"vfio/{V2}/migration/state"
    if mode == "vfio":
        assert k.read_debugfs(path) == "RUNNING\n"
    elif mode == "denied":          # mount root mode 0700, caller not root
        assert _errno(k.read_debugfs, path) == errno.EACCES
        assert _errno(k.list_debugfs, "") == errno.EACCES
    else:
        assert _errno(k.read_debugfs, path) == errno.ENOENT
        assert "vfio" not in k.list_debugfs("")
        assert (k.list_debugfs("") == []) == (mode == "unmounted")


def test_an_unknown_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="debugfs mode"):
        _host(tmp_path, "maybe")


def test_a_failing_driver_read_is_einval_and_paths_stay_under_the_root(tmp_path: Path) -> None:
    k = _host(tmp_path).kernel
    k.faults.inject("debugfs:state", errno.EINVAL)
    assert _errno(k.read_debugfs, f"vfio/{V2}/migration/state") == errno.EINVAL
    assert k.read_debugfs(f"vfio/{V2}/migration/state") == "RUNNING\n"
    for bad in ("../etc/passwd", "/etc/passwd", "vfio/../../x", "vfio/a\0b"):
        assert _errno(k.read_debugfs, bad) == errno.EINVAL
        assert _errno(LinuxKernel().read_debugfs, bad) == errno.EINVAL
        assert _errno(LinuxKernel().list_debugfs, bad) == errno.EINVAL


def test_reading_opens_nothing_and_counts_its_reads(tmp_path: Path) -> None:
    host = _host(tmp_path)
    k = host.kernel
    for _ in range(5):
        k.read_debugfs(f"vfio/{V2}/migration/state")
    assert k.debugfs.reads == 5
    assert not k.node_opens and not k.open_files()
    assert host.device(V2).open_count == 0
    # and a real open is counted: the check above can fail
    fd = k.open(f"{host.dev_root}/vfio/vfio", 2)
    assert sum(k.node_opens.values()) == 1
    k.close(fd)
