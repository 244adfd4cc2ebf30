"""The VFIO device cdev ``/dev/vfio/devices/vfioN`` (6.6+, docs/kernel-contract.md §4.1 - §4.2), kept
minimal: enough to bind a device to iommufd and attach it to an IOAS or a HWPT, so
iommufd dirty tracking sees its DMA.

* Opening it while the device's group is open the legacy way is EBUSY (and the group
  cannot be opened while a member's cdev is open).
* Until ``VFIO_DEVICE_BIND_IOMMUFD`` succeeds every other ioctl, read, write and mmap is
  EINVAL. BIND: argsz >= 16, flags 0 (the 6.17+ token flag is not simulated), a negative
  fd → EINVAL, a closed fd → EBADF, an fd that is not an iommufd → EBADFD, a second bind →
  EINVAL.
* ATTACH (argsz >= 12, flags 0) to a HWPT or an IOAS (an auto HWPT is created or reused
  and its id written back into ``pt_id``); a second ATTACH replaces the first. DETACH
  (argsz >= 8, flags 0).
* After BIND the fd is an ordinary device fd (regions, features, migration).
Closing it unbinds: the device object goes, auto HWPTs with no device left go too.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import vfiod.abi.vfio as v
from vfiod.abi.layout import offsetofend
from vfiod.kernel.sim.base import SimFile, fail
from vfiod.kernel.sim.device import DeviceFile
from vfiod.kernel.sim.iommufd import IommufdFile
from vfiod.kernel.sim.uaccess import arg_view, copy_in, copy_out

if TYPE_CHECKING:
    from vfiod.kernel.ops import Buffer
    from vfiod.kernel.sim.kernel import SimKernel
    from vfiod.kernel.sim.node import SimDevice


class CdevFile(SimFile):
    kind = "device"
    ioctl_names = v.DEVICE_IOCTLS

    def __init__(self, node: SimDevice, kernel: SimKernel) -> None:
        super().__init__(node.name)
        self.node = node
        self.kernel = kernel
        self.iommufd: IommufdFile | None = None
        self.dev_id = 0
        self.inner: DeviceFile | None = None

    @classmethod
    def open(cls, node: SimDevice, kernel: SimKernel) -> CdevFile:
        if node.group is not None and node.group.file is not None:
            raise fail(errno.EBUSY, "open", node.name,
                       f"{node.group.name} is open through /dev/vfio/{node.group.number}")
        node.cdev_open += 1
        return cls(node, kernel)

    def _bound(self, op: str) -> DeviceFile:
        if self.inner is None:
            raise fail(errno.EINVAL, op, self.name, "cdev not bound to iommufd yet "
                       "(VFIO_DEVICE_BIND_IOMMUFD)")
        return self.inner

    def ioctl(self, request: int, arg: int | Buffer, label: str) -> int:
        if request == v.VFIO_DEVICE_BIND_IOMMUFD:
            return self._bind(arg, label)
        inner = self._bound(label)
        if request == v.VFIO_DEVICE_ATTACH_IOMMUFD_PT:
            return self._attach(arg, label)
        if request == v.VFIO_DEVICE_DETACH_IOMMUFD_PT:
            return self._detach(arg, label)
        return inner.ioctl(request, arg, label)

    def _bind(self, arg: int | Buffer, op: str) -> int:
        mv = arg_view(arg, op, self.name)
        minsz = offsetofend(v.vfio_device_bind_iommufd, "out_devid")
        bind = copy_in(mv, v.vfio_device_bind_iommufd, op, self.name, need=minsz)
        if bind.argsz < minsz or bind.flags or bind.iommufd < 0:
            raise fail(errno.EINVAL, op, self.name,
                       f"argsz {bind.argsz}, flags {bind.flags:#x}, iommufd {bind.iommufd}")
        if self.inner is not None:
            raise fail(errno.EINVAL, op, self.name, "already bound")
        target = self.kernel.file_of(bind.iommufd)
        if target is None:
            err = errno.EBADF if self.kernel.is_sim_fd(bind.iommufd) else errno.EBADFD
            raise fail(err, op, self.name, f"fd {bind.iommufd} is not an open iommufd")
        if not isinstance(target, IommufdFile):
            raise fail(errno.EBADFD, op, self.name, f"fd {bind.iommufd} is a {target.kind} "
                       "fd, not an iommufd")
        self.iommufd = target
        self.dev_id = target.bind(self.node)
        self.inner = DeviceFile(self.node)
        bind.out_devid = self.dev_id
        copy_out(mv, bind, minsz, op, self.name)
        return 0

    def _attach(self, arg: int | Buffer, op: str) -> int:
        mv = arg_view(arg, op, self.name)
        minsz = offsetofend(v.vfio_device_attach_iommufd_pt, "pt_id")
        att = copy_in(mv, v.vfio_device_attach_iommufd_pt, op, self.name, need=minsz)
        if att.argsz < minsz or att.flags:
            raise fail(errno.EINVAL, op, self.name, f"argsz {att.argsz}, flags {att.flags:#x}")
        assert self.iommufd is not None
        att.pt_id = self.iommufd.attach(self.dev_id, att.pt_id, op)
        copy_out(mv, att, minsz, op, self.name)
        return 0

    def _detach(self, arg: int | Buffer, op: str) -> int:
        mv = arg_view(arg, op, self.name)
        minsz = offsetofend(v.vfio_device_detach_iommufd_pt, "flags")
        det = copy_in(mv, v.vfio_device_detach_iommufd_pt, op, self.name, need=minsz)
        if det.argsz < minsz or det.flags:
            raise fail(errno.EINVAL, op, self.name, f"argsz {det.argsz}, flags {det.flags:#x}")
        assert self.iommufd is not None
        idev = self.iommufd.objects[self.dev_id]
        self.iommufd.detach(idev)  # type: ignore[arg-type]
        return 0

    def read(self, length: int) -> bytes:
        return self._bound("read").read(length)

    def write(self, data: bytes) -> int:
        return self._bound("write").write(data)

    def pread(self, length: int, offset: int) -> bytes:
        return self._bound("pread").pread(length, offset)

    def pwrite(self, data: bytes, offset: int) -> int:
        return self._bound("pwrite").pwrite(data, offset)

    def mmap(self, length: int, offset: int, prot: int) -> object:
        return self._bound("mmap").mmap(length, offset, prot)

    def release(self) -> None:
        if self.closed:
            return
        super().release()
        if self.inner is not None and self.iommufd is not None:
            self.iommufd.unbind(self.dev_id)
            self.inner.release()
        self.node.cdev_open -= 1
