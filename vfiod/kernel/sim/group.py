"""IOMMU groups and the group fd ``/dev/vfio/N`` (docs/kernel-contract.md §3.1 - §3.2, §8).

Kernel rules kept here:
* One open at a time: a second ``open`` is EBUSY (also while a member's cdev is open).
* ``GET_STATUS``: VIABLE unless a member is bound to a host driver (its DMA ownership is
  claimed elsewhere); CONTAINER_SET once attached (then also VIABLE).
* ``SET_CONTAINER`` takes a pointer to an int fd: EBADF for a bad fd, EBADFD for an fd
  that is not a container, EINVAL if already set, EPERM if the group is not viable (DMA
  ownership cannot be claimed).
* ``UNSET_CONTAINER``: EINVAL if not set, EBUSY while device fds are open; the last group
  leaving a container releases its IOMMU (all mappings go).
* ``GET_DEVICE_FD`` takes a NUL-terminated name (a VF may append `` vf_token=<uuid>``):
  ENODEV for a name not in the group, then EINVAL without a container with an IOMMU.
* Device fds hold the group: closing the group fd while devices are open keeps it alive;
  the group is released (container detached, reopen allowed) with the last of them.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import vfiod.abi.vfio as v
from vfiod.kernel.sim.base import SimFile, fail
from vfiod.kernel.sim.device import DeviceFile
from vfiod.kernel.sim.uaccess import arg_view, copy_in, copy_out, read_u32

if TYPE_CHECKING:
    from vfiod.kernel.ops import Buffer
    from vfiod.kernel.sim.container import ContainerFile
    from vfiod.kernel.sim.kernel import SimKernel
    from vfiod.kernel.sim.node import SimDevice

#: strndup_user limit: a device name longer than a page is refused.
_NAME_MAX = 4096


class SimGroup:
    """IOMMU group ``number``: its VFIO devices and its host-bound (foreign) members."""

    def __init__(self, number: int, devices: list[SimDevice],
                 host_members: list[tuple[str, str | None]]) -> None:
        self.number = number
        self.devices = devices
        self.host_members = host_members
        self.file: GroupFile | None = None
        self.container: ContainerFile | None = None
        self.device_fds = 0

    @property
    def name(self) -> str:
        return f"group {self.number}"

    @property
    def viable(self) -> bool:
        """Every member is VFIO-bound or unbound (docs/kernel-contract.md §3.1 step 1)."""
        return all(driver is None for _, driver in self.host_members)

    @property
    def kind(self) -> str:
        """"mdev" for an emulated-IOMMU group (pinned-page scope), else "pci"."""
        return "mdev" if self.devices and all(d.kind == "mdev" for d in self.devices) else "pci"

    def open(self, kernel: SimKernel, flags: int) -> GroupFile:
        if self.file is not None:
            raise fail(errno.EBUSY, "open", self.name, "group is already open")
        if any(d.cdev_open for d in self.devices):
            raise fail(errno.EBUSY, "open", self.name, "a member device's cdev is open")
        self.file = GroupFile(self, kernel)
        return self.file

    def device(self, name: str) -> SimDevice | None:
        for d in self.devices:
            if d.name == name:
                return d
        return None


class GroupFile(SimFile):
    kind = "group"
    ioctl_names = v.GROUP_IOCTLS

    def __init__(self, group: SimGroup, kernel: SimKernel) -> None:
        super().__init__(group.name)
        self.group = group
        self.kernel = kernel

    def ioctl(self, request: int, arg: int | Buffer, label: str) -> int:
        if request == v.VFIO_GROUP_GET_STATUS:
            return self._status(arg, label)
        if request == v.VFIO_GROUP_SET_CONTAINER:
            return self._set_container(arg, label)
        if request == v.VFIO_GROUP_UNSET_CONTAINER:
            return self._unset_container(label)
        if request == v.VFIO_GROUP_GET_DEVICE_FD:
            return self._get_device_fd(arg, label)
        raise fail(errno.ENOTTY, label, self.name)

    def _status(self, arg: int | Buffer, op: str) -> int:
        mv = arg_view(arg, op, self.name)
        st = copy_in(mv, v.vfio_group_status, op, self.name)
        if st.argsz < 8:
            raise fail(errno.EINVAL, op, self.name, f"argsz {st.argsz} < 8")
        st.flags = 0
        if self.group.container is not None:
            st.flags = v.VFIO_GROUP_FLAGS_CONTAINER_SET | v.VFIO_GROUP_FLAGS_VIABLE
        elif self.group.viable:
            st.flags = v.VFIO_GROUP_FLAGS_VIABLE
        copy_out(mv, st, 8, op, self.name)
        return 0

    def _set_container(self, arg: int | Buffer, op: str) -> int:
        from vfiod.kernel.sim.container import ContainerFile

        mv = arg_view(arg, op, self.name)
        fd = read_u32(mv, op, self.name)
        fd = fd - (1 << 32) if fd >= 1 << 31 else fd          # it is an int
        target = self.kernel.file_of(fd)
        if target is None:
            if fd < 0 or self.kernel.is_sim_fd(fd):
                raise fail(errno.EBADF, op, self.name, f"fd {fd} is not open")
            raise fail(errno.EBADFD, op, self.name, f"fd {fd} is not a VFIO container")
        if self.group.container is not None:
            raise fail(errno.EINVAL, op, self.name, "group already has a container")
        if not isinstance(target, ContainerFile):
            detail = (f"fd {fd} is an iommufd: the iommufd VFIO-compat container is not "
                      "simulated" if target.kind == "iommufd" else
                      f"fd {fd} is a {target.kind} fd, not a container")
            raise fail(errno.EBADFD, op, self.name, detail)
        if not self.group.viable:
            # iommu_group_claim_dma_owner(): a host driver bound to a member holds an
            # owner count, so the claim fails with EPERM (drivers/iommu/iommu.c, 5.19+).
            raise fail(errno.EPERM, op, self.name,
                       "DMA ownership is held by a host driver of another group member")
        target.attach_group(self.group, op)
        self.group.container = target
        return 0

    def _unset_container(self, op: str) -> int:
        if self.group.container is None:
            raise fail(errno.EINVAL, op, self.name, "no container set")
        if self.group.device_fds:
            raise fail(errno.EBUSY, op, self.name,
                       f"{self.group.device_fds} device fd(s) still open")
        self._detach()
        return 0

    def _detach(self) -> None:
        container = self.group.container
        if container is not None:
            self.group.container = None
            container.detach_group(self.group)

    def _get_device_fd(self, arg: int | Buffer, op: str) -> int:
        mv = arg_view(arg, op, self.name)
        raw = bytes(mv[:_NAME_MAX])
        nul = raw.find(b"\0")
        if nul < 0:
            raise fail(errno.EINVAL, op, self.name, "device name is not NUL-terminated")
        text = raw[:nul].decode("utf-8", "replace")
        name, _, rest = text.partition(" ")
        dev = self.group.device(name)
        if dev is None:
            raise fail(errno.ENODEV, op, self.name, f"no device {name!r} in this group")
        if rest and not rest.startswith("vf_token="):
            raise fail(errno.EINVAL, op, dev.name, f"unexpected text after the name: {rest!r}")
        container = self.group.container
        if container is None or container.iommu is None:
            raise fail(errno.EINVAL, op, dev.name,
                       "group has no container with an IOMMU set (SET_CONTAINER, SET_IOMMU)")
        self.group.device_fds += 1
        return self.kernel.install(DeviceFile(dev, on_release=self._device_closed))

    def _device_closed(self) -> None:
        self.group.device_fds -= 1
        if self.group.device_fds == 0 and self.closed:
            self._final_release()

    def release(self) -> None:
        if self.closed:
            return
        super().release()
        if self.group.device_fds == 0:
            self._final_release()

    def _final_release(self) -> None:
        self._detach()
        if self.group.file is self:
            self.group.file = None
