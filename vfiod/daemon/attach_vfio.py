"""Checking the VFIO fds an ``attach`` hands over against the guest's configuration and
the kernel, before any is used (docs/architecture.md §8.1).

The request must hand over, for every container of the guest's ``from = "vmm"``
devices, the container fd, the fd of each IOMMU group sysfs puts those devices in, and
each device's fd: exactly those, each fd index once. A device the guest does not take
from the VMM, a group none of them is in, or a group another open guest holds (a foreign
fd) is refused. Then each fd is checked by ``vfiod/vfio/handover.py``: the container's
type and IOMMU, each group's number and status, each device fd's kind and identity.
Every refusal is an ``ApiError`` naming the fd index and what was wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from vfiod.api.ops import AttachArgs, VfioHandOver
from vfiod.daemon.attach import Refuse
from vfiod.daemon.config import GuestConfig
from vfiod.daemon.guests import GuestManager
from vfiod.errors import KernelError
from vfiod.kernel.ops import KernelOps
from vfiod.migration.guest import HandedVfio
from vfiod.vfio import HostPaths
from vfiod.vfio.discovery import discover_device
from vfiod.vfio.handover import (
    HandedFdRefused,
    check_container_fd,
    check_device_fd,
    check_group_fd,
)


def groups_held(guests: GuestManager, names: Iterable[str]) -> dict[int, str]:
    """IOMMU group number -> the open guest (of ``names``) whose containers hold it."""
    out: dict[int, str] = {}
    for name in names:
        guest = guests.opened(name)
        for c in guest.containers if guest is not None else ():
            out.update((g.number, name) for g in c.container.groups)
    return out


def check_vfio_hand_over(kernel: KernelOps, paths: HostPaths, gc: GuestConfig,
                         args: AttachArgs, refuse: Refuse,
                         groups_held: Mapping[int, str]) -> dict[str, HandedVfio]:
    """Container name -> the checked fds for ``GuestManager.attach``; ``groups_held``:
    IOMMU group number -> the open guest that holds it."""
    wanted = {d.name: d for d in gc.vmm_devices}
    if not args.vfio:
        if wanted:
            raise refuse(f"device(s) {sorted(wanted)} are from the VMM: hand over their "
                         "container, group and device fds (vfio)")
        return {}
    if not wanted:
        raise refuse('its configuration takes no devices from the VMM (no [[guest.device]] '
                     'with from = "vmm"), but vfio fds came')
    _check_indexes(args, refuse)
    out: dict[str, HandedVfio] = {}
    seen: set[str] = set()
    for i, h in enumerate(args.vfio):
        names = [n for n, _ in h.devices]
        unknown = sorted(n for n in names if n not in wanted)
        if unknown:
            raise refuse(f"vfio[{i}]: device(s) {unknown} are not from = \"vmm\" devices of "
                         f"the guest (those are {sorted(wanted)}): foreign fds")
        twice = sorted(n for n in names if n in seen or names.count(n) > 1)
        if twice:
            raise refuse(f"vfio[{i}]: device(s) {twice} are handed over twice")
        seen.update(names)
        containers = {wanted[n].container for n in names}
        if len(containers) > 1:
            raise refuse(f"vfio[{i}]: its devices belong to containers {sorted(containers)} "
                         "of the configuration: one container fd per container")
        cname = containers.pop()
        if cname in out:
            raise refuse(f"vfio[{i}]: container {cname!r} is handed over twice")
        missing = sorted(n for n, d in wanted.items() if d.container == cname and n not in names)
        if missing:
            raise refuse(f"vfio[{i}]: device(s) {missing} of container {cname!r} were not "
                         "handed over")
        _check_groups(kernel, paths, h, i, refuse, groups_held)
        out[cname] = _check_fds(kernel, paths, h, args, refuse)
    missing = sorted(set(wanted) - seen)
    if missing:
        raise refuse(f"device(s) {missing} were not handed over")
    return out


def _check_indexes(args: AttachArgs, refuse: Refuse) -> None:
    """Every index names a sent fd, and none serves two roles."""
    roles: dict[int, str] = {}
    for r in args.ram:
        roles.setdefault(r.fd, f"RAM region {r.region}")
    for i, h in enumerate(args.vfio):
        named = [(h.container, f"vfio[{i}] container")]
        named += [(fd, f"vfio[{i}] group {g}") for g, fd in h.groups]
        named += [(fd, f"vfio[{i}] device {n}") for n, fd in h.devices]
        for fd, role in named:
            if fd >= len(args.fds):
                raise refuse(f"{role} names fd index {fd}, but {len(args.fds)} fd(s) came "
                             "with the request")
            if fd in roles:
                raise refuse(f"fd index {fd} is handed over as {roles[fd]} and as {role}: "
                             "a duplicated fd")
            roles[fd] = role


def _check_groups(kernel: KernelOps, paths: HostPaths, h: VfioHandOver, i: int,
                  refuse: Refuse, groups_held: Mapping[int, str]) -> None:
    numbers = [g for g, _ in h.groups]
    if len(set(numbers)) != len(numbers):
        raise refuse(f"vfio[{i}]: a group is handed over twice ({numbers})")
    need: dict[int, list[str]] = {}
    for name, _ in h.devices:
        found = discover_device(kernel, name, paths)
        if found.group is None:
            raise refuse(f"vfio[{i}]: device {name} has no IOMMU group in sysfs: "
                         f"{found.reason}")
        need.setdefault(found.group, []).append(name)
    for number, fd in h.groups:
        if number not in need:
            raise refuse(f"fd index {fd} (group {number}): none of the handed devices is in "
                         f"group {number} (they are in {sorted(need)})")
        if number in groups_held:
            raise refuse(f"fd index {fd} (group {number}): guest {groups_held[number]} "
                         f"holds group {number}: a foreign fd")
    for number, names in sorted(need.items()):
        if number not in numbers:
            raise refuse(f"vfio[{i}]: device(s) {names} are in group {number}, whose fd was "
                         "not handed over")


def _check_fds(kernel: KernelOps, paths: HostPaths, h: VfioHandOver, args: AttachArgs,
               refuse: Refuse) -> HandedVfio:
    fds = args.fds
    group_fd = {g: fds[i] for g, i in h.groups}
    try:
        check_container_fd(kernel, paths, fds[h.container], h.container)
        for number, i in h.groups:
            check_group_fd(kernel, paths, fds[i], i, number)
        for name, i in h.devices:
            group = discover_device(kernel, name, paths).group
            assert group is not None             # _check_groups made sure
            check_device_fd(kernel, paths, fds[i], i, name, group_fd[group], group)
    except HandedFdRefused as e:
        raise refuse(str(e)) from None
    except KernelError as e:                       # sysfs went away under the check
        raise refuse(f"the VFIO fds cannot be checked: {e}") from None
    return HandedVfio(fds[h.container], group_fd, {n: fds[i] for n, i in h.devices},
                      args.allow_reset)
