"""A VFIO device opened through its character device ``/dev/vfio/devices/vfioN`` and bound
to iommufd instead of a group/container (docs/kernel-contract.md §4.1 steps 1, 3, 6; §4.2; 6.6+).

Until ``bind`` succeeds every other ioctl on the fd fails with EINVAL; after it the object
is an ordinary ``Device`` (regions, features, migration). A group opened the legacy way and
a cdev of the same group exclude each other (EBUSY).
"""

from __future__ import annotations

import ctypes
import errno
import os

import vfiod.abi.vfio as v
from vfiod.errors import KernelError
from vfiod.kernel.ops import KernelOps
from vfiod.vfio.call import ioctl
from vfiod.vfio.device import Device
from vfiod.vfio.discovery import discover_device
from vfiod.vfio.iommufd import Iommufd
from vfiod.vfio.paths import HostPaths


class CdevDevice(Device):
    dev_id: int | None = None       # iommufd device id after bind
    pt_id: int | None = None        # attached HWPT (or the auto HWPT of an IOAS)

    @classmethod
    def open(cls, kernel: KernelOps, name: str, paths: HostPaths | None = None,
             cdev: str | None = None) -> CdevDevice:
        """Open the cdev of device ``name`` (found in sysfs unless ``cdev`` is given)."""
        paths = paths or HostPaths()
        if cdev is None:
            cdev = discover_device(kernel, name, paths).cdev
            if cdev is None:
                raise KernelError(errno.ENODEV, "open(vfio cdev)", name,
                                  "sysfs shows no vfio-dev/vfioN: kernel older than 6.6, "
                                  "CONFIG_VFIO_DEVICE_CDEV off, or not bound to VFIO")
        path = paths.vfio_cdev(cdev)
        try:
            fd = kernel.open(path, os.O_RDWR)
        except KernelError as e:
            detail = ("its group is open through /dev/vfio/N (legacy path)"
                      if e.errno == errno.EBUSY else e.detail)
            raise KernelError(e.errno or errno.EIO, f"open({path})", name, detail) from None
        return cls(kernel, fd, name)

    def bind(self, iommufd: Iommufd) -> int:
        """``VFIO_DEVICE_BIND_IOMMUFD`` → the iommufd device id (bind only once)."""
        arg = v.vfio_device_bind_iommufd(argsz=ctypes.sizeof(v.vfio_device_bind_iommufd),
                                         flags=0, iommufd=iommufd.fd)
        ioctl(self.kernel, self.fd, v.VFIO_DEVICE_BIND_IOMMUFD, arg,
              "VFIO_DEVICE_BIND_IOMMUFD", self.name)
        self.dev_id = int(arg.out_devid)
        return self.dev_id

    def attach(self, pt_id: int) -> int:
        """``VFIO_DEVICE_ATTACH_IOMMUFD_PT`` to a HWPT or an IOAS; returns the HWPT id the
        kernel used (for an IOAS: the one it created or reused)."""
        arg = v.vfio_device_attach_iommufd_pt(
            argsz=ctypes.sizeof(v.vfio_device_attach_iommufd_pt), flags=0, pt_id=pt_id)
        ioctl(self.kernel, self.fd, v.VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg,
              f"VFIO_DEVICE_ATTACH_IOMMUFD_PT({pt_id})", self.name)
        self.pt_id = int(arg.pt_id)
        return self.pt_id

    def detach(self) -> None:
        arg = v.vfio_device_detach_iommufd_pt(
            argsz=ctypes.sizeof(v.vfio_device_detach_iommufd_pt), flags=0)
        ioctl(self.kernel, self.fd, v.VFIO_DEVICE_DETACH_IOMMUFD_PT, arg,
              "VFIO_DEVICE_DETACH_IOMMUFD_PT", self.name)
        self.pt_id = None
