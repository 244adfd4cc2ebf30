"""The device fd of the simulated kernel (docs/kernel-contract.md §3.3 - §3.5, §6.1).

Generic like vfio-pci core: the fixed PCI regions and IRQs come from ``pci.PciFunction``;
everything migration-related is plugged in as ``DeviceParts`` (interfaces.py): extra
regions (the v1 migration region) and ``FeatureHandler``s. This file enforces what the
kernel enforces for every device before a driver sees a request: argsz minimums, index
ranges, the capability-chain two-call pattern, and the ``VFIO_DEVICE_FEATURE`` rules
(argsz >= 8, no unknown flag bits, GET+SET only with PROBE, PROBE answered from the
handler's directions, ENOTTY for a feature no handler owns — the 6.18+ answer; an mdev
sample on older kernels said EINVAL, ``spec.extra["unknown_feature_errno"]``).

Region access: ``pread``/``pwrite``/``mmap`` at ``index << 40`` plus the offset inside.
Before each feature GET/SET the fault point ``feature:<NAME>`` (e.g.
``feature:DMA_LOGGING_REPORT``) is checked with the device name as target.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import vfiod.abi.vfio as v
from vfiod.abi.layout import offsetofend
from vfiod.kernel.sim.base import SimFile, fail
from vfiod.kernel.sim.interfaces import FeatureHandler, SimRegion
from vfiod.kernel.sim.pci import region_offset, split_offset
from vfiod.kernel.sim.uaccess import arg_view, chain_caps, copy_in, copy_out

if TYPE_CHECKING:
    from vfiod.kernel.ops import Buffer
    from vfiod.kernel.sim.node import SimDevice

_FEATURE_DIRS = v.VFIO_DEVICE_FEATURE_GET | v.VFIO_DEVICE_FEATURE_SET
_FEATURE_KNOWN = v.VFIO_DEVICE_FEATURE_MASK | _FEATURE_DIRS | v.VFIO_DEVICE_FEATURE_PROBE

_IRQ_DATA = {v.VFIO_IRQ_SET_DATA_NONE: 0, v.VFIO_IRQ_SET_DATA_BOOL: 1,
             v.VFIO_IRQ_SET_DATA_EVENTFD: 4}
_IRQ_ACTIONS = (v.VFIO_IRQ_SET_ACTION_MASK, v.VFIO_IRQ_SET_ACTION_UNMASK,
                v.VFIO_IRQ_SET_ACTION_TRIGGER)


class DeviceFile(SimFile):
    """An open VFIO device (from GET_DEVICE_FD, or a cdev after BIND)."""

    kind = "device"
    ioctl_names = v.DEVICE_IOCTLS

    def __init__(self, node: SimDevice, on_release: Callable[[], None] | None = None) -> None:
        super().__init__(node.name)
        self.node = node
        self._on_release = on_release
        self._regions: dict[int, SimRegion] = {r.index: r for r in node.parts.regions}
        self._features: dict[int, FeatureHandler] = {}
        for handler in node.parts.features:
            for fid in handler.feature_ids:
                if fid in self._features:
                    raise ValueError(f"{node.name}: feature {fid} has two handlers")
                self._features[fid] = handler
        self._handlers: dict[int, Callable[[int | Buffer, str], int]] = {
            v.VFIO_DEVICE_GET_INFO: self._get_info,
            v.VFIO_DEVICE_GET_REGION_INFO: self._region_info,
            v.VFIO_DEVICE_GET_IRQ_INFO: self._irq_info,
            v.VFIO_DEVICE_SET_IRQS: self._set_irqs,
            v.VFIO_DEVICE_RESET: self._reset,
            v.VFIO_DEVICE_FEATURE: self._feature,
        }
        node.opened()

    @property
    def num_regions(self) -> int:
        return max([v.VFIO_PCI_NUM_REGIONS] + [i + 1 for i in self._regions])

    def release(self) -> None:
        if self.closed:
            return
        super().release()
        self.node.closed()
        if self._on_release is not None:
            self._on_release()

    def ioctl(self, request: int, arg: int | Buffer, label: str) -> int:
        handler = self._handlers.get(request)
        if handler is not None:
            return handler(arg, label)
        if request in (v.VFIO_DEVICE_ATTACH_IOMMUFD_PT, v.VFIO_DEVICE_DETACH_IOMMUFD_PT):
            raise fail(errno.EINVAL, label, self.name, "device was opened through its group, "
                       "not bound to iommufd")
        raise fail(errno.ENOTTY, label, self.name, "not implemented by this device")

    # -- info ------------------------------------------------------------------------------
    def _get_info(self, arg: int | Buffer, op: str) -> int:
        mv = arg_view(arg, op, self.name)
        minsz = offsetofend(v.vfio_device_info, "num_irqs")
        info = copy_in(mv, v.vfio_device_info, op, self.name, need=minsz)
        if info.argsz < minsz:
            raise fail(errno.EINVAL, op, self.name, f"argsz {info.argsz} < {minsz}")
        capsz = offsetofend(v.vfio_device_info, "cap_offset")
        if info.argsz >= capsz:
            minsz = capsz
            info.cap_offset = 0               # no device capabilities on x86 vfio-pci
        info.flags = v.VFIO_DEVICE_FLAGS_PCI
        if self.node.pci.reset_works:
            info.flags |= v.VFIO_DEVICE_FLAGS_RESET
        info.num_regions = self.num_regions
        info.num_irqs = v.VFIO_PCI_NUM_IRQS
        copy_out(mv, info, minsz, op, self.name)
        return 0

    def _region_info(self, arg: int | Buffer, op: str) -> int:
        mv = arg_view(arg, op, self.name)
        minsz = offsetofend(v.vfio_region_info, "offset")
        info = copy_in(mv, v.vfio_region_info, op, self.name, need=minsz)
        if info.argsz < minsz:
            raise fail(errno.EINVAL, op, self.name, f"argsz {info.argsz} < {minsz}")
        index = info.index
        if index >= self.num_regions:
            raise fail(errno.EINVAL, op, self.name, f"region index {index} >= "
                       f"num_regions {self.num_regions}")
        if index < v.VFIO_PCI_NUM_REGIONS:
            fixed = self.node.pci.region(index)
            size, flags, caps = fixed.size, fixed.flags, fixed.caps
        else:
            region = self._regions.get(index)
            if region is None:
                raise fail(errno.EINVAL, op, self.name, f"no region {index}")
            size, flags, caps = region.size, region.flags, list(region.caps())
        info.offset = region_offset(index)
        info.size = size
        info.flags = flags & ~v.VFIO_REGION_INFO_FLAG_CAPS
        info.cap_offset = 0
        if caps:
            chain = chain_caps(caps, minsz, self.node.caps_align8)
            info.flags |= v.VFIO_REGION_INFO_FLAG_CAPS
            if info.argsz < minsz + len(chain):
                # First call of the two-call pattern: say how much room is needed.
                info.argsz = minsz + len(chain)
            else:
                copy_out(mv, chain, len(chain), op, self.name, offset=minsz)
                info.cap_offset = minsz
        copy_out(mv, info, minsz, op, self.name)
        return 0

    def _irq_info(self, arg: int | Buffer, op: str) -> int:
        mv = arg_view(arg, op, self.name)
        minsz = offsetofend(v.vfio_irq_info, "count")
        info = copy_in(mv, v.vfio_irq_info, op, self.name, need=minsz)
        if info.argsz < minsz or info.index >= v.VFIO_PCI_NUM_IRQS:
            raise fail(errno.EINVAL, op, self.name,
                       f"argsz {info.argsz} / irq index {info.index} out of range")
        info.flags, info.count = self.node.pci.irq_info(info.index)
        copy_out(mv, info, minsz, op, self.name)
        return 0

    # -- interrupts ------------------------------------------------------------------------
    def _set_irqs(self, arg: int | Buffer, op: str) -> int:
        mv = arg_view(arg, op, self.name)
        minsz = ctypes.sizeof(v.vfio_irq_set)
        hdr = copy_in(mv, v.vfio_irq_set, op, self.name, need=minsz)
        known = v.VFIO_IRQ_SET_DATA_TYPE_MASK | v.VFIO_IRQ_SET_ACTION_TYPE_MASK
        data_type = hdr.flags & v.VFIO_IRQ_SET_DATA_TYPE_MASK
        action = hdr.flags & v.VFIO_IRQ_SET_ACTION_TYPE_MASK
        if hdr.argsz < minsz or hdr.flags & ~known or data_type not in _IRQ_DATA:
            raise fail(errno.EINVAL, op, self.name, f"argsz {hdr.argsz}, flags {hdr.flags:#x}")
        max_irq = self.node.pci.irq_info(hdr.index)[1] if hdr.index < v.VFIO_PCI_NUM_IRQS else 0
        size = _IRQ_DATA[data_type]
        if (hdr.argsz - minsz < hdr.count * size or hdr.start >= max_irq
                or hdr.start + hdr.count > max_irq):
            raise fail(errno.EINVAL, op, self.name,
                       f"vectors {hdr.start}+{hdr.count} of irq {hdr.index} (has {max_irq})")
        if action not in _IRQ_ACTIONS:
            raise fail(errno.ENOTTY, op, self.name, f"action bits {action:#x}")
        if hdr.argsz > len(mv):
            raise fail(errno.EFAULT, op, self.name, "argsz beyond the argument buffer")
        data = bytes(mv[minsz:minsz + hdr.count * size])
        self._apply_irqs(hdr.index, hdr.start, hdr.count, data_type, action, data, op)
        return 0

    def _apply_irqs(self, index: int, start: int, count: int, data_type: int, action: int,
                    data: bytes, op: str) -> None:
        pci = self.node.pci
        vectors = range(start, start + count)
        if action != v.VFIO_IRQ_SET_ACTION_TRIGGER:
            if index != v.VFIO_PCI_INTX_IRQ_INDEX:
                raise fail(errno.ENOTTY, op, self.name, "only INTx can be masked")
            masked = pci.irq_masked.setdefault(index, set())
            for i, vec in enumerate(vectors):
                if data_type == v.VFIO_IRQ_SET_DATA_BOOL and not data[i]:
                    continue
                (masked.add if action == v.VFIO_IRQ_SET_ACTION_MASK else masked.discard)(vec)
            return
        if data_type == v.VFIO_IRQ_SET_DATA_EVENTFD:
            fds = pci.irq_fds.setdefault(index, {})
            for i, vec in enumerate(vectors):
                (fd,) = struct.unpack_from("=i", data, 4 * i)
                if fd < -1:
                    raise fail(errno.EINVAL, op, self.name, f"bad eventfd {fd}")
                if fd == -1:
                    fds.pop(vec, None)
                else:
                    fds[vec] = fd
            return
        if count == 0 and data_type == v.VFIO_IRQ_SET_DATA_NONE:
            pci.irq_fds.pop(index, None)        # DATA_NONE|TRIGGER, count 0: disable
            return
        for i, vec in enumerate(vectors):
            if data_type == v.VFIO_IRQ_SET_DATA_BOOL and not data[i]:
                continue
            self.node.signal_irq(index, vec)      # loopback trigger, as vfio-pci does

    def _reset(self, arg: int | Buffer, op: str) -> int:
        if not self.node.pci.reset_works:
            raise fail(errno.EINVAL, op, self.name, "device has no VFIO_DEVICE_FLAGS_RESET")
        self.node.reset_parts()
        self.node.pci.reset()
        return 0

    # -- VFIO_DEVICE_FEATURE (§6.1) --------------------------------------------------------
    def _feature(self, arg: int | Buffer, op: str) -> int:
        mv = arg_view(arg, op, self.name)
        minsz = ctypes.sizeof(v.vfio_device_feature)
        hdr = copy_in(mv, v.vfio_device_feature, op, self.name, need=minsz)
        flags = hdr.flags
        if hdr.argsz < minsz:
            raise fail(errno.EINVAL, op, self.name, f"argsz {hdr.argsz} < {minsz}")
        if flags & ~_FEATURE_KNOWN:
            raise fail(errno.EINVAL, op, self.name, f"unknown flag bits {flags & ~_FEATURE_KNOWN:#x}")
        probe = bool(flags & v.VFIO_DEVICE_FEATURE_PROBE)
        if not probe and flags & _FEATURE_DIRS == _FEATURE_DIRS:
            raise fail(errno.EINVAL, op, self.name, "GET and SET together without PROBE")
        fid = flags & v.VFIO_DEVICE_FEATURE_MASK
        handler = self._features.get(fid)
        if handler is None:
            err = int(self.node.spec.extra.get("unknown_feature_errno", errno.ENOTTY))  # type: ignore[call-overload]
            raise fail(err, op, self.name, f"feature {fid} not supported by this device")
        unsupported = flags & _FEATURE_DIRS & ~handler.directions(fid)
        if unsupported:
            raise fail(errno.EINVAL, op, self.name,
                       f"feature {fid} does not support direction {unsupported:#x}")
        if probe:
            return 0
        if not flags & _FEATURE_DIRS:
            raise fail(errno.EINVAL, op, self.name, "neither GET nor SET (nor PROBE)")
        if hdr.argsz > len(mv):
            raise fail(errno.EFAULT, op, self.name,
                       f"argsz {hdr.argsz} beyond the {len(mv)}-byte argument buffer")
        name = v.FEATURE_NAMES.get(fid, str(fid))
        self.node.kernel.faults.check(f"feature:{name}", op, self.name)
        handler.handle(fid, flags, mv[minsz:hdr.argsz])
        return 0

    # -- region access ---------------------------------------------------------------------
    def _region_for(self, offset: int, op: str) -> tuple[int, int, SimRegion | None]:
        index, off = split_offset(offset)
        if index >= self.num_regions:
            raise fail(errno.EINVAL, op, self.name, f"offset {offset:#x}: no region {index}")
        if index < v.VFIO_PCI_NUM_REGIONS:
            return index, off, None
        region = self._regions.get(index)
        if region is None:
            raise fail(errno.EINVAL, op, self.name, f"offset {offset:#x}: no region {index}")
        return index, off, region

    def pread(self, length: int, offset: int) -> bytes:
        index, off, region = self._region_for(offset, "pread")
        if region is not None:
            return region.pread(length, off)
        return self.node.pci.pread(index, off, length, self.name)

    def pwrite(self, data: bytes, offset: int) -> int:
        index, off, region = self._region_for(offset, "pwrite")
        if region is not None:
            return region.pwrite(data, off)
        return self.node.pci.pwrite(index, off, data, self.name)

    def mmap(self, length: int, offset: int, prot: int) -> object:
        index, off, region = self._region_for(offset, "mmap")
        if region is not None:
            if not region.flags & v.VFIO_REGION_INFO_FLAG_MMAP:
                raise fail(errno.EINVAL, "mmap", self.name, f"region {index} is not mmappable")
            return region.mmap(length, off, prot)
        return self.node.pci.mmap(index, off, length, prot, self.name)
