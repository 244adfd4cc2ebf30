"""A VMM hands over the VFIO fds of a guest's ``from = "vmm"`` devices with ``attach``
(container, groups, devices; docs/architecture.md §8.1), on the sim backend with the
daemon in-process (tests/support/sim_vmm.py says why): every wrong, foreign, closed or
duplicated fd is refused naming its index and what was wrong, and nothing is held after
a refusal; an accepted hand-over works on copies, so the VMM's fds keep working after
``detach``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.sim_vmm import SimVmm, call, hand_over, sim_daemon_in_process, vmms_closed
from vfiod.api.schema import ApiError
from vfiod.daemon.main import Daemon
from vfiod.migration.states import MigState
from vfiod.vfio import Container, Group
from vfiod.vfio.discovery import discover_device

MIB = 1 << 20
A, B, C, D = "0000:3b:00.1", "0000:3b:00.2", "0000:5e:00.1", "0000:5e:00.2"


def _config() -> str:
    text = ""
    for guest, dev in (("a", A), ("b", B), ("c", C)):
        text += f'''
[[guest]]
name = "{guest}"
[[guest.ram]]
name = "ram"
size = "8MiB"
from = "vmm"
[[guest.device]]
name = "{dev}"
from = "vmm"
'''
    text += "\n[sim]\n"
    for dev, group in ((A, None), (B, None), (C, 50), (D, 50)):
        text += f'[[sim.device]]\nname = "{dev}"\ncapability = "v2_precopy_p2p_log"\n'
        text += f"group = {group}\n" if group is not None else ""
    return text


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with sim_daemon_in_process(tmp_path_factory.mktemp("vfio-attach"), _config()) as d:
        yield d


def _state(d: Daemon, guest: str) -> str:
    return call(d, "status", {"guest": guest})["guests"][0]["state"]


def _refused(d: Daemon, raw: dict, fds: list[int]) -> str:
    before = set(d.kernel.open_files())
    with pytest.raises(ApiError) as e:
        hand_over(d, raw, fds)
    assert _state(d, raw["guest"]) == "defined"
    assert set(d.kernel.open_files()) == before, "a refused attach left fds open"
    assert e.value.message.endswith("nothing was attached"), e.value.message
    return e.value.message


def _group(d: Daemon, name: str) -> int:
    number = discover_device(d.kernel, name, d.paths).group
    assert number is not None
    return number


def test_a_handed_over_device_is_used_through_copies_and_given_back(daemon) -> None:
    vmm = SimVmm(daemon, [A], 8 * MIB, "vmm-a")
    with vmms_closed(vmm):
        r = hand_over(daemon, vmm.request("a"), vmm.fds())
        assert (r["state"], r["devices"]) == ("running", [A]), r
        guest = daemon.guests.opened("a")
        assert guest is not None
        mine = guest.device(A).device
        assert mine.fd != vmm.devices[A].fd                    # its own copy
        assert guest.device(A).driver.state().name == "RUNNING"
        assert call(daemon, "detach", {"guest": "a"})["state"] == "defined"
        # vfiod closed its copies; the VMM's device fd still works, its group is still
        # attached to its container (vfiod never sent UNSET_CONTAINER)
        assert daemon.kernel.file_of(mine.fd) is None
        assert vmm.devices[A].info().num_regions > 0
        assert vmm.groups[_group(daemon, A)].status() == (True, True)


def test_every_wrong_foreign_closed_or_duplicated_fd_is_refused(daemon) -> None:
    vmm = SimVmm(daemon, [A], 8 * MIB, "vmm-bad")
    other = SimVmm(daemon, [B], 8 * MIB, "vmm-other")
    ga, gb = _group(daemon, A), _group(daemon, B)
    fds = vmm.fds()            # ram 0, container 1, group 2, device 3
    rd, wr = os.pipe()
    try:
        req = vmm.request("a")
        # wrong: the group fd where the container goes, the container where a group goes
        msg = _refused(daemon, req, [fds[0], fds[2], fds[1], fds[3]])
        assert (f"fd index 1 (container) is group {ga} (/dev/vfio/{ga}), not the VFIO "
                "container") in msg, msg
        # not VFIO: a pipe as the device
        msg = _refused(daemon, req, [*fds[:3], rd])
        assert f"fd index 3 (device {A}) is a fifo file, not a VFIO device fd" in msg, msg
        # closed: a device fd that is not open
        closed = daemon.kernel.dup(fds[3])
        daemon.kernel.close(closed)
        msg = _refused(daemon, req, [*fds[:3], closed])
        assert f"fd index 3 (device {A}) cannot be examined" in msg and "EBADF" in msg, msg
        # duplicated: one index as the group and as the device
        dup = vmm.request("a")
        dup["vfio"][0]["devices"][0]["fd"] = 2
        msg = _refused(daemon, dup, fds[:3])
        assert (f"fd index 2 is handed over as vfio[0] group {ga} and as vfio[0] device "
                f"{A}: a duplicated fd") in msg, msg
        # foreign: another guest's device named, another guest's group fd given as ours
        msg = _refused(daemon, other.request("a"), [fds[0], *other.fds()[1:]])
        assert f"device(s) ['{B}'] are not from = \"vmm\" devices of the guest" in msg, msg
        msg = _refused(daemon, req, [*fds[:2], other.fds()[2], fds[3]])
        assert f"fd index 2 (group {ga}) is group {gb} (/dev/vfio/{gb}), not group {ga}" in msg
        # wrong: the container where the device goes
        msg = _refused(daemon, req, [*fds[:3], fds[1]])
        assert (f"fd index 3 (device {A}) is the VFIO container (/dev/vfio/vfio), not a "
                "VFIO device fd") in msg, msg
        # an extra fd no role uses, a missing group
        msg = _refused(daemon, req, [*fds, wr])
        assert "fd index(es) [4] came with the request but no region or VFIO object" in msg
        no_group = vmm.request("a")
        no_group["vfio"][0]["groups"] = [{"group": gb, "fd": 2}]
        msg = _refused(daemon, no_group, fds)
        assert f"none of the handed devices is in group {gb}" in msg, msg
        # VFIO fds for a guest that takes no device from its VMM is refused by config
        msg = _refused(daemon, {**req, "vfio": []}, fds[:1])
        assert f"device(s) ['{A}'] are from the VMM: hand over their container" in msg
        # and then the right fds are taken
        assert hand_over(daemon, req, fds)["state"] == "running"
        assert call(daemon, "detach", {"guest": "a"})["state"] == "defined"
    finally:
        os.close(rd)
        os.close(wr)
        vmm.close()
        other.close()


def test_an_unfinished_vmm_setup_is_refused(daemon) -> None:
    """A container without its IOMMU, a group without its container."""
    k, paths = daemon.kernel, daemon.paths
    vmm = SimVmm(daemon, [A], 8 * MIB, "vmm-setup")
    ga = _group(daemon, A)
    bare = Container.open(k, paths)
    lone = Group.open(k, paths, _group(daemon, B))
    try:
        fds = vmm.fds()
        msg = _refused(daemon, vmm.request("a"), [fds[0], bare.fd, *fds[2:]])
        assert "fd index 1 (container) has no IOMMU set (VFIO_SET_IOMMU)" in msg, msg
        req = {**vmm.request("b"), "vfio": [{"container": 1,
                                              "groups": [{"group": lone.number, "fd": 2}],
                                              "devices": [{"name": B, "fd": 3}]}]}
        msg = _refused(daemon, req, [fds[0], fds[1], lone.fd, fds[3]])
        assert (f"fd index 2 (group {lone.number}) has no container set "
                "(VFIO_GROUP_GET_STATUS)") in msg, msg
        assert ga != lone.number
    finally:
        lone.close()
        bare.close()
        vmm.close()


def test_a_device_its_group_shares_with_an_alike_device_is_refused(daemon) -> None:
    vmm = SimVmm(daemon, [C], 8 * MIB, "vmm-alike")
    with vmms_closed(vmm):
        msg = _refused(daemon, vmm.request("c"), vmm.fds())
        assert (f"fd index 3 (device {C}) cannot be told apart from {D} of group 50, which "
                "sysfs describes alike") in msg, msg


def test_the_config_rules_for_devices_from_the_vmm(tmp_path: Path) -> None:
    from vfiod.daemon.config import parse_config
    from vfiod.errors import ConfigError

    base = '[[guest]]\nname = "g"\n[[guest.ram]]\nsize = "8MiB"\n'
    with pytest.raises(ConfigError) as e:
        parse_config(base + f'[[guest.device]]\nname = "{A}"\nfrom = "vmm"\n')
    assert "a device from the VMM needs guest g's RAM from the VMM too" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config(base + 'from = "vmm"\n' + f'[[guest.device]]\nname = "{A}"\n'
                     f'from = "vmm"\n[[guest.device]]\nname = "{B}"\n')
    assert "a container's devices are all from the VMM" in str(e.value), str(e.value)


def test_a_stopped_device_is_reset_only_if_its_vmm_allows(daemon) -> None:
    """A device the VMM hands over must be RUNNING; vfiod resets one that is not only
    with ``allow_reset: true`` (docs/architecture.md §8.1)."""
    vmm = SimVmm(daemon, [A], 8 * MIB, "vmm-stopped")
    with vmms_closed(vmm):
        vmm.devices[A].set_mig_state(MigState.STOP)
        msg = _refused(daemon, vmm.request("a"), vmm.fds())
        assert (f"{A}: device is in STOP, not RUNNING, and its VMM did not allow vfiod to "
                "reset it (allow_reset false): the device needs its VMM") in msg, msg
        assert vmm.devices[A].get_mig_state() is MigState.STOP          # untouched
        assert hand_over(daemon, vmm.request("a", allow_reset=True),
                         vmm.fds())["state"] == "running"
        assert vmm.devices[A].get_mig_state() is MigState.RUNNING
        assert call(daemon, "detach", {"guest": "a"})["state"] == "defined"
