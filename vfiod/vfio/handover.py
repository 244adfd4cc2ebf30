"""Checking the VFIO fds a VMM hands over with ``attach`` before any is used
(docs/architecture.md §8.1; docs/kernel-contract.md §3.1 the opening sequence, §3.2
``vfio_group_status``, §3.3 ``VFIO_DEVICE_GET_INFO``).

What the kernel offers to tell a VFIO fd's kind and identity (Linux 6.12):

* ``fstat``: the container ``/dev/vfio/vfio`` and a group ``/dev/vfio/N`` are character
  devices; ``/sys/dev/char/MAJ:MIN`` links to the device the kernel registered for that
  number: ``devices/virtual/misc/vfio`` (the container) or ``devices/virtual/vfio/N``
  (group N; its minor is not N). That names a group exactly.
* A device fd from ``VFIO_GROUP_GET_DEVICE_FD`` is an anonymous inode: no file type,
  one inode shared by every such fd, ``/proc/self/fd/N`` links to
  ``anon_inode:[vfio-device]``, and its ``fdinfo`` has ``pos``, ``flags``, ``mnt_id``,
  ``ino`` only (a ``vfio-device-syspath`` line was proposed upstream in 2025; 6.12 has
  none). Nothing names its device. vfiod therefore opens
  its own reference fd of the named device through the handed group (the kernel looks
  the name up: ENODEV if the group has no such device) and requires the handed fd to
  describe itself the same way (``VFIO_DEVICE_GET_INFO``, every region's size and
  flags); a group holding another device that sysfs describes alike is refused, since
  the two could not be told apart.

Every check only reads: status and info ioctls, sysfs links; the reference device fd is
closed before the check returns. A failure raises ``HandedFdRefused`` naming the fd by
its index in the order the VMM sent them.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

import vfiod.abi.vfio as v
from vfiod.errors import KernelError, VfiodError
from vfiod.kernel.ops import FdFacts, KernelOps
from vfiod.vfio.call import ioctl
from vfiod.vfio.container import Container
from vfiod.vfio.device import Device
from vfiod.vfio.discovery import discover_device
from vfiod.vfio.group import Group
from vfiod.vfio.paths import HostPaths

#: what ``/proc/self/fd/N`` says of a device fd from VFIO_GROUP_GET_DEVICE_FD
DEVICE_FD_LINK = "anon_inode:[vfio-device]"


class HandedFdRefused(VfiodError):
    """fd ``index`` of an attach request is not what its role needs; ``reason`` says
    what was wrong."""

    def __init__(self, index: int, role: str, reason: str) -> None:
        super().__init__(f"fd index {index} ({role}) {reason}")
        self.index, self.role, self.reason = index, role, reason


@dataclass(frozen=True)
class FdKind:
    """What an fd is, from fstat, its /proc link and /sys/dev/char."""

    kind: str               # "container" | "group" | "device" | "cdev" | "iommufd" | "other"
    what: str               # for messages: "group 12 (/dev/vfio/12)", "a fifo" ...
    group: int | None = None
    facts: FdFacts | None = None


def classify_fd(kernel: KernelOps, paths: HostPaths, fd: int) -> FdKind:
    """What ``fd`` is; ``KernelError`` (EBADF) if it is not open."""
    f = kernel.describe_fd(fd)
    if f.rdev is None:
        if f.link == DEVICE_FD_LINK:
            return FdKind("device", "a VFIO device fd", facts=f)
        what = f.link if f.link.startswith("anon_inode:") else f"a {f.kind} file"
        return FdKind("other", what, facts=f)
    major, minor = f.rdev
    try:
        target = kernel.readlink(os.path.join(paths.sysfs_root, "dev", "char",
                                              f"{major}:{minor}")).rstrip("/")
    except KernelError:
        return FdKind("other", f"character device {major}:{minor}", facts=f)
    parent, base = os.path.split(target)
    if target.endswith("virtual/misc/vfio"):
        return FdKind("container", "the VFIO container (/dev/vfio/vfio)", facts=f)
    if target.endswith("virtual/misc/iommu"):
        return FdKind("iommufd", "an iommufd (/dev/iommu)", facts=f)
    if parent.endswith("virtual/vfio"):
        if base.isdigit():
            return FdKind("group", f"group {base} (/dev/vfio/{base})", int(base), f)
        return FdKind("other", f"the no-IOMMU group {base}", facts=f)
    if os.path.basename(parent) == "vfio-dev":
        device = os.path.basename(os.path.dirname(parent))
        return FdKind("cdev", f"the VFIO cdev {base} of {device}", facts=f)
    return FdKind("other", f"character device {major}:{minor} ({base})", facts=f)


def _kind(kernel: KernelOps, paths: HostPaths, fd: int, index: int, role: str) -> FdKind:
    try:
        return classify_fd(kernel, paths, fd)
    except KernelError as e:
        raise HandedFdRefused(index, role, f"cannot be examined: {e}") from None


def check_container_fd(kernel: KernelOps, paths: HostPaths, fd: int, index: int) -> None:
    """A type1 container with its IOMMU set (the VMM attached its groups and called
    VFIO_SET_IOMMU)."""
    role = "container"
    k = _kind(kernel, paths, fd, index, role)
    if k.kind != "container":
        raise HandedFdRefused(index, role, f"is {k.what}, not the VFIO container")
    try:
        Container.adopt(kernel, fd)           # API version 0 and type1v2 offered
    except KernelError as e:
        raise HandedFdRefused(index, role, f"is no usable type1 container: {e}") from None
    try:
        Container(kernel, fd, role).iommu_info()
    except KernelError as e:
        why = ("has no IOMMU set (VFIO_SET_IOMMU): the VMM has not finished setting it up"
               if e.errno == errno.EINVAL else f"VFIO_IOMMU_GET_INFO failed: {e}")
        raise HandedFdRefused(index, role, why) from None


def check_group_fd(kernel: KernelOps, paths: HostPaths, fd: int, index: int,
                   number: int) -> None:
    """Group ``number``'s fd, viable, with a container set."""
    role = f"group {number}"
    k = _kind(kernel, paths, fd, index, role)
    if k.kind != "group":
        raise HandedFdRefused(index, role, f"is {k.what}, not a VFIO group")
    if k.group != number:
        raise HandedFdRefused(index, role, f"is {k.what}, not group {number}")
    try:
        viable, container_set = Group(kernel, fd, number, paths).status()
    except KernelError as e:
        raise HandedFdRefused(index, role, f"VFIO_GROUP_GET_STATUS failed: {e}") from None
    if not viable:
        raise HandedFdRefused(index, role, "is not viable (VFIO_GROUP_GET_STATUS)")
    if not container_set:
        raise HandedFdRefused(index, role, "has no container set (VFIO_GROUP_GET_STATUS): "
                              "the VMM has not attached it")


def _describe(dev: Device) -> tuple[object, ...]:
    info = dev.info()
    return (info.flags, info.num_regions, info.num_irqs,
            tuple((r.index, r.size, r.flags) for r in dev.regions()))


def check_device_fd(kernel: KernelOps, paths: HostPaths, fd: int, index: int, name: str,
                    group_fd: int, number: int) -> None:
    """A device fd that is device ``name`` of group ``number`` (whose checked fd is
    ``group_fd``), as far as the kernel lets vfiod tell (module docstring)."""
    role = f"device {name}"
    k = _kind(kernel, paths, fd, index, role)
    if k.kind == "cdev":
        raise HandedFdRefused(index, role, f"is {k.what}: a cdev comes with an iommufd, "
                              "not with a container and groups")
    if k.kind != "device":
        raise HandedFdRefused(index, role, f"is {k.what}, not a VFIO device fd")
    handed = Device(kernel, fd, name)
    try:
        theirs = _describe(handed)
    except KernelError as e:
        raise HandedFdRefused(index, role, f"does not answer as a device: {e}") from None
    arg = ctypes.create_string_buffer(name.encode() + b"\0")
    try:
        ref_fd = ioctl(kernel, group_fd, v.VFIO_GROUP_GET_DEVICE_FD, arg,
                       f"VFIO_GROUP_GET_DEVICE_FD({name})", f"group {number}")
    except KernelError as e:
        raise HandedFdRefused(index, role, f"cannot be matched: group {number} does not "
                              f"give device {name}: {e}") from None
    try:
        mine = _describe(Device(kernel, ref_fd, name))
    finally:
        try:
            kernel.close(ref_fd)
        except KernelError:
            pass                # a reference fd that will not close holds nothing new
    if mine != theirs:
        raise HandedFdRefused(index, role, f"is not device {name}: it describes itself as "
                              f"{_text(theirs)}, {name} as {_text(mine)}")
    _check_unambiguous(kernel, paths, index, role, name, number)


def _text(desc: tuple[object, ...]) -> str:
    return f"flags {desc[0]}, {desc[1]} regions, {desc[2]} irqs, regions {desc[3]}"


def _identity(kernel: KernelOps, paths: HostPaths, name: str) -> tuple[object, ...]:
    d = discover_device(kernel, name, paths)
    return (d.kind, d.vendor, d.device, d.subsystem_vendor, d.subsystem_device,
            d.mdev_type, d.driver)


def _check_unambiguous(kernel: KernelOps, paths: HostPaths, index: int, role: str,
                       name: str, number: int) -> None:
    members = kernel.listdir(os.path.join(paths.iommu_group_dir(number), "devices"))
    mine = _identity(kernel, paths, name)
    alike = [m for m in members if m != name and _identity(kernel, paths, m) == mine]
    if alike:
        raise HandedFdRefused(index, role, f"cannot be told apart from {', '.join(alike)} "
                              f"of group {number}, which sysfs describes alike: a device "
                              "fd does not say which device it is (Linux 6.12)")
