"""A VFIO group fd (``/dev/vfio/N``): status, container attach/detach, device fds
(docs/kernel-contract.md §3.1 steps 3-4 and 7, §3.2; errno facts from §8).

Only one process can have a group open (EBUSY for the next): vfiod is then not the owner,
a VMM is, and the error says so. A group whose members are not all VFIO-bound (or unbound)
is not viable; the error lists the culprits that sysfs discovery can see.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import TYPE_CHECKING

import vfiod.abi.vfio as v
from vfiod.errors import KernelError
from vfiod.kernel.ops import KernelOps
from vfiod.vfio.call import OwnedFd, ioctl
from vfiod.vfio.device import Device
from vfiod.vfio.discovery import group_viability
from vfiod.vfio.paths import HostPaths

if TYPE_CHECKING:
    from vfiod.vfio.container import Container


class Group(OwnedFd):
    """One group fd. ``close`` closes its devices and detaches it from its container
    first."""

    def __init__(self, kernel: KernelOps, fd: int, number: int,
                 paths: HostPaths | None = None) -> None:
        super().__init__(kernel, fd, f"group {number}")
        self.number = number
        self.paths = paths or HostPaths()
        self.container: Container | None = None
        self.devices: list[Device] = []
        #: a copy of a VMM's group fd (docs/architecture.md §8.1): the group's container
        #: is the VMM's, so closing this copy never detaches it (no UNSET_CONTAINER)
        self.adopted = False

    @classmethod
    def open(cls, kernel: KernelOps, paths: HostPaths | None, number: int, *,
             noiommu: bool = False) -> Group:
        """Open ``/dev/vfio/N`` and require it to be viable."""
        paths = paths or HostPaths()
        path = paths.vfio_group(number, noiommu)
        name = f"group {number}"
        try:
            fd = kernel.open(path, os.O_RDWR)
        except KernelError as e:
            err = e.errno or errno.EIO
            detail = {
                errno.EBUSY: f"{name} is already open by another process (a VMM?)",
                errno.ENOENT: f"{path} does not exist: is a device of IOMMU group {number} "
                              "bound to a VFIO driver?",
                errno.EPERM: "a no-IOMMU group needs CAP_SYS_RAWIO" if noiommu else e.detail,
                errno.EACCES: f"no permission on {path} (vfio group membership?)",
            }.get(err, e.detail)
            raise KernelError(err, f"open({path})", name, detail) from None
        g = cls(kernel, fd, number, paths)
        try:
            if not g.status()[0]:
                via = group_viability(kernel, paths, number)
                why = "; ".join(via.blockers) or "sysfs shows no reason (device being unbound?)"
                # EPERM: what the kernel's DMA-ownership claim answers for such a group
                raise KernelError(errno.EPERM, "VFIO_GROUP_GET_STATUS", name,
                                  f"{name} is not viable: {why}")
        except BaseException:
            kernel.close(fd)
            raise
        return g

    @classmethod
    def adopt(cls, kernel: KernelOps, fd: int, number: int,
              container: Container | None = None) -> Group:
        """Wrap a group fd handed over by a VMM (already attached to ``container``);
        closing it closes only this fd and its devices' fds."""
        g = cls(kernel, fd, number)
        g.adopted = True
        if container is not None:
            g.container = container
            container.groups.append(g)
        return g

    def status(self) -> tuple[bool, bool]:
        """``VFIO_GROUP_GET_STATUS`` → (viable, container set)."""
        st = v.vfio_group_status(argsz=ctypes.sizeof(v.vfio_group_status), flags=0)
        ioctl(self.kernel, self.fd, v.VFIO_GROUP_GET_STATUS, st, "VFIO_GROUP_GET_STATUS",
              self.name)
        return (bool(st.flags & v.VFIO_GROUP_FLAGS_VIABLE),
                bool(st.flags & v.VFIO_GROUP_FLAGS_CONTAINER_SET))

    def set_container(self, container: Container) -> None:
        """``VFIO_GROUP_SET_CONTAINER``; the container then closes this group."""
        if self.container is not None:
            raise KernelError(errno.EINVAL, "VFIO_GROUP_SET_CONTAINER", self.name,
                              f"already attached to {self.container.name}")
        ioctl(self.kernel, self.fd, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(container.fd),
              "VFIO_GROUP_SET_CONTAINER", self.name)
        self.container = container
        container.groups.append(self)

    def unset_container(self) -> None:
        """``VFIO_GROUP_UNSET_CONTAINER``: only once no device fd of the group is open
        (the kernel answers EBUSY otherwise), so close devices first."""
        if self.container is None:
            return
        try:
            ioctl(self.kernel, self.fd, v.VFIO_GROUP_UNSET_CONTAINER, 0,
                  "VFIO_GROUP_UNSET_CONTAINER", self.name)
        except KernelError as e:
            open_devs = [d.name for d in self.devices if not d.closed]
            if e.errno == errno.EBUSY and open_devs:
                raise KernelError(errno.EBUSY, e.op, self.name, "device fds still open: "
                                  + ", ".join(open_devs) + " (close devices first)") from None
            raise
        if self in self.container.groups:
            self.container.groups.remove(self)
        self.container = None

    def get_device(self, name: str) -> Device:
        """``VFIO_GROUP_GET_DEVICE_FD`` by BDF or mdev UUID (a VF may need
        ``"<BDF> vf_token=<uuid>"``); needs the container set first."""
        op = f"VFIO_GROUP_GET_DEVICE_FD({name})"
        if self.container is None:
            raise KernelError(errno.EINVAL, op, self.name,
                              "set a container (and its IOMMU) before asking for devices")
        arg = ctypes.create_string_buffer(name.encode() + b"\0")
        try:
            fd = ioctl(self.kernel, self.fd, v.VFIO_GROUP_GET_DEVICE_FD, arg, op, self.name)
        except KernelError as e:
            if e.errno == errno.ENODEV:
                raise KernelError(e.errno, op, self.name,
                                  f"{name} is not a device of {self.name}") from None
            raise
        dev = Device(self.kernel, fd, name.split(" ", 1)[0], group=self)
        self.devices.append(dev)
        return dev

    def _close_members(self) -> KernelError | None:
        """Close this group's devices, then detach it from the container (which the
        kernel refuses while a device fd is open)."""
        first: KernelError | None = None
        for d in self.devices:
            try:
                d.close()
            except KernelError as e:
                first = first or e
        if self.adopted:
            if self.container is not None and self in self.container.groups:
                self.container.groups.remove(self)
            self.container = None
            return first
        try:
            self.unset_container()
        except KernelError as e:
            first = first or e
            if self.container is not None and self in self.container.groups:
                self.container.groups.remove(self)
            self.container = None
        return first
