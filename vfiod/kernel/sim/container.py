"""The container fd ``/dev/vfio/vfio`` (docs/kernel-contract.md §3.1, §8).

``GET_API_VERSION`` (0), ``CHECK_EXTENSION`` (answered by the type1 driver: TYPE1,
TYPE1v2, UNMAP_ALL always; UPDATE_VADDR and DMA_CC_IOMMU once an IOMMU is set, and
UPDATE_VADDR not with emulated-IOMMU devices), ``SET_IOMMU`` (EINVAL with no group or
when already set, ENODEV for a type no driver offers). Every other request goes to the
IOMMU driver once set (``type1.Type1Iommu``), and is EINVAL before.

A container outlives its fd while groups are attached (they hold a reference); the last
group leaving releases the IOMMU and with it every mapping.
"""

from __future__ import annotations

import errno
import itertools
from typing import TYPE_CHECKING

import vfiod.abi.vfio as v
from vfiod.kernel.sim.base import SimFile, fail
from vfiod.kernel.sim.type1 import Type1Config, Type1Iommu

if TYPE_CHECKING:
    from vfiod.kernel.ops import Buffer
    from vfiod.kernel.sim.group import SimGroup
    from vfiod.kernel.sim.kernel import SimKernel

_ids = itertools.count(1)


class ContainerFile(SimFile):
    kind = "container"
    ioctl_names = v.CONTAINER_IOCTLS

    def __init__(self, kernel: SimKernel, config: Type1Config) -> None:
        super().__init__(f"container {next(_ids)}")
        self.kernel = kernel
        self.config = config
        self.groups: list[SimGroup] = []
        self.iommu: Type1Iommu | None = None

    def ioctl(self, request: int, arg: int | Buffer, label: str) -> int:
        if request == v.VFIO_GET_API_VERSION:
            return v.VFIO_API_VERSION
        if request == v.VFIO_CHECK_EXTENSION:
            return self._check_extension(self._value(arg, label))
        if request == v.VFIO_SET_IOMMU:
            return self._set_iommu(self._value(arg, label), label)
        if self.iommu is None:
            raise fail(errno.EINVAL, label, self.name, "no IOMMU set (VFIO_SET_IOMMU first)")
        return self.iommu.ioctl(request, arg, label)

    def _value(self, arg: int | Buffer, op: str) -> int:
        if not isinstance(arg, int):
            raise fail(errno.EINVAL, op, self.name, "argument is passed by value (an int)")
        return arg

    def _check_extension(self, ext: int) -> int:
        if ext in (v.VFIO_TYPE1_IOMMU, v.VFIO_TYPE1v2_IOMMU, v.VFIO_UNMAP_ALL):
            return 1
        if ext == v.VFIO_UPDATE_VADDR:
            return int(self.iommu is not None
                       and not any(g.kind == "mdev" for g in self.groups))
        if ext == v.VFIO_DMA_CC_IOMMU:
            return int(self.iommu is not None)
        return 0

    def _set_iommu(self, iommu_type: int, op: str) -> int:
        if not self.groups:
            raise fail(errno.EINVAL, op, self.name, "no group attached (SET_CONTAINER first)")
        if self.iommu is not None:
            raise fail(errno.EINVAL, op, self.name, "IOMMU already set")
        if iommu_type not in (v.VFIO_TYPE1_IOMMU, v.VFIO_TYPE1v2_IOMMU):
            raise fail(errno.ENODEV, op, self.name, f"no IOMMU driver for type {iommu_type}")
        iommu = Type1Iommu(self.kernel, self.config, v2=iommu_type == v.VFIO_TYPE1v2_IOMMU,
                           name=self.name)
        for group in self.groups:
            iommu.attach(group)
        self.iommu = iommu
        return 0

    def attach_group(self, group: SimGroup, op: str) -> None:
        if self.iommu is not None:
            self.iommu.attach(group)
        self.groups.append(group)

    def detach_group(self, group: SimGroup) -> None:
        self.groups.remove(group)
        if self.iommu is not None:
            self.iommu.detach(group)
            if not self.groups:
                # The last group out releases the IOMMU driver: every mapping is gone.
                self.iommu.release()
                self.iommu = None
