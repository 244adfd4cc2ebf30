"""``/dev/iommu``: the iommufd objects vfiod's dirty tracking needs (docs/kernel-contract.md §4.3 -
§4.4): IOAS (alloc, map, unmap, IOVA ranges), device objects (created by a cdev BIND),
HWPTs (alloc with DIRTY_TRACKING, auto-created on attach to an IOAS), hardware info,
dirty tracking on/off and the dirty bitmap; ``IOMMU_DESTROY``.

iommufd's conventions are applied to every command: ``size`` below the command's minimum
→ EINVAL; bytes beyond what the kernel knows must be zero (E2BIG); unknown flags or a
non-zero reserved field → EOPNOTSUPP; unknown object id → ENOENT; arithmetic overflow →
EOVERFLOW. Only the commands that answer (alloc, map, unmap, ranges, hw info, hwpt alloc)
copy back ``min(size, known)`` bytes.

Dirty tracking: a HWPT allocated with DIRTY_TRACKING (EOPNOTSUPP unless the device's IOMMU
has A/D bits: ``SimHostConfig.iommu_dirty_tracking``) records the DMA writes of the devices
attached to it while tracking is enabled; enabling clears stale bits; GET ORs the pages
into the caller's bitmap relative to the requested IOVA, at its page size (a power of two
>= 4 KiB here), and clears them unless NO_CLEAR.

Not simulated (ENOTTY): IOAS_ALLOW_IOVAS, IOAS_COPY, OPTION, VFIO_IOAS, nesting, fault
queues (FAULT_ID_VALID → EOPNOTSUPP).
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import vfiod.abi.iommufd as iu
from vfiod.kernel.sim.base import SimFile, copy_to_user, fail
from vfiod.kernel.sim.iommufd_objects import PAGE_SIZE, Hwpt, Idev, Ioas
from vfiod.kernel.sim.uaccess import U64_MAX, arg_view, read_u32

if TYPE_CHECKING:
    from vfiod.kernel.ops import Buffer
    from vfiod.kernel.sim.kernel import SimKernel
    from vfiod.kernel.sim.node import SimDevice

ULONG_MAX = U64_MAX
Obj = Ioas | Hwpt | Idev


class IommufdFile(SimFile):
    kind = "iommufd"
    ioctl_names = iu.IOMMUFD_IOCTLS

    def __init__(self, kernel: SimKernel) -> None:
        super().__init__("iommufd")
        self.kernel = kernel
        self.objects: dict[int, Obj] = {}
        self._next_id = 1
        # request -> (struct, mandatory prefix end field, handler returning "respond?")
        self._ops: dict[int, tuple[type[ctypes.Structure], str, Callable[[Any, str], bool]]] = {
            iu.IOMMU_DESTROY: (iu.iommu_destroy, "id", self._destroy),
            iu.IOMMU_IOAS_ALLOC: (iu.iommu_ioas_alloc, "out_ioas_id", self._ioas_alloc),
            iu.IOMMU_IOAS_IOVA_RANGES: (iu.iommu_ioas_iova_ranges, "out_iova_alignment",
                                        self._iova_ranges),
            iu.IOMMU_IOAS_MAP: (iu.iommu_ioas_map, "iova", self._map),
            iu.IOMMU_IOAS_UNMAP: (iu.iommu_ioas_unmap, "length", self._unmap),
            iu.IOMMU_HWPT_ALLOC: (iu.iommu_hwpt_alloc, "__reserved", self._hwpt_alloc),
            iu.IOMMU_GET_HW_INFO: (iu.iommu_hw_info, "__reserved", self._hw_info),
            iu.IOMMU_HWPT_SET_DIRTY_TRACKING: (iu.iommu_hwpt_set_dirty_tracking, "__reserved",
                                               self._set_dirty),
            iu.IOMMU_HWPT_GET_DIRTY_BITMAP: (iu.iommu_hwpt_get_dirty_bitmap, "data",
                                             self._get_dirty),
        }

    # -- objects (also used by the cdev) ---------------------------------------------------
    def _add(self, make: Callable[[int], Obj]) -> Obj:
        obj = make(self._next_id)
        self.objects[self._next_id] = obj
        self._next_id += 1
        return obj

    def _get(self, obj_id: int, kind: type, op: str) -> Any:
        obj = self.objects.get(obj_id)
        if not isinstance(obj, kind):
            raise fail(errno.ENOENT, op, self.name, f"no {kind.__name__.lower()} object {obj_id}")
        return obj

    def bind(self, node: SimDevice) -> int:
        return self._add(lambda i: Idev(i, node)).id

    def unbind(self, dev_id: int) -> None:
        idev = self.objects.pop(dev_id)
        assert isinstance(idev, Idev)
        self.detach(idev)

    def attach(self, dev_id: int, pt_id: int, op: str) -> int:
        """Attach device ``dev_id`` to HWPT ``pt_id``, or to an auto HWPT of IOAS ``pt_id``
        (reused when compatible); returns the HWPT id."""
        idev = self._get(dev_id, Idev, op)
        target = self.objects.get(pt_id)
        hwpt: Hwpt
        if isinstance(target, Ioas):
            ioas = target
            found = next((h for h in ioas.hwpts if h.auto and not h.dirty_capable), None)
            if found is None:
                made = self._add(lambda i: Hwpt(i, ioas, dirty_capable=False, auto=True))
                assert isinstance(made, Hwpt)
                ioas.hwpts.append(made)
                found = made
            hwpt = found
        elif isinstance(target, Hwpt):
            hwpt = target
            if hwpt.dirty_capable and not idev.node.iommu_dirty_tracking:
                raise fail(errno.EINVAL, op, idev.node.name, "HWPT enforces dirty tracking; "
                           "this device's IOMMU has none")
        else:
            raise fail(errno.ENOENT, op, self.name, f"no IOAS or HWPT {pt_id}")
        if idev.node.kind == "mdev" and not hwpt.auto:
            raise fail(errno.EINVAL, op, idev.node.name, "an emulated-IOMMU device attaches "
                       "to an IOAS, not a HWPT")
        self.detach(idev)
        idev.hwpt = hwpt
        hwpt.devices.add(idev.id)
        idev.node.iommufd_domain = hwpt
        return hwpt.id

    def detach(self, idev: Idev) -> None:
        hwpt = idev.hwpt
        if hwpt is None:
            return
        hwpt.devices.discard(idev.id)
        idev.hwpt = None
        idev.node.iommufd_domain = None
        if hwpt.auto and not hwpt.devices:
            hwpt.ioas.hwpts.remove(hwpt)
            del self.objects[hwpt.id]

    # -- dispatch --------------------------------------------------------------------------
    def ioctl(self, request: int, arg: int | Buffer, label: str) -> int:
        entry = self._ops.get(request)
        if entry is None:
            raise fail(errno.ENOTTY, label, self.name, "iommufd command not simulated")
        struct_type, last_field, handler = entry
        mv = arg_view(arg, label, self.name)
        size = read_u32(mv, label, self.name)
        field = getattr(struct_type, last_field)
        if size < field.offset + field.size:
            raise fail(errno.EINVAL, label, self.name, f"size {size} < "
                       f"{field.offset + field.size}")
        if size > len(mv):
            raise fail(errno.EFAULT, label, self.name, f"size {size} beyond the buffer")
        known = ctypes.sizeof(struct_type)
        if size > known and any(bytes(mv[known:size])):
            raise fail(errno.E2BIG, label, self.name, f"non-zero bytes past the {known} "
                       "this kernel understands")
        take = min(size, known)
        cmd = struct_type.from_buffer_copy(bytes(mv[:take]).ljust(known, b"\0"))
        try:
            respond = handler(cmd, label)
        except _RespondThen as e:
            mv[:take] = e.data[:take]
            raise e.err from None
        if respond:
            mv[:take] = bytes(cmd)[:take]
        return 0

    # -- commands --------------------------------------------------------------------------
    def _destroy(self, cmd: iu.iommu_destroy, op: str) -> bool:
        obj = self.objects.get(cmd.id)
        if obj is None:
            raise fail(errno.ENOENT, op, self.name, f"no object {cmd.id}")
        busy = ((isinstance(obj, Ioas) and obj.hwpts) or (isinstance(obj, Hwpt) and obj.devices)
                or isinstance(obj, Idev))
        if busy:
            raise fail(errno.EBUSY, op, self.name, f"object {cmd.id} is in use")
        if isinstance(obj, Hwpt):
            obj.ioas.hwpts.remove(obj)
        if isinstance(obj, Ioas):
            self.kernel.locked_bytes -= obj.release()
        del self.objects[cmd.id]
        return False

    def _ioas_alloc(self, cmd: iu.iommu_ioas_alloc, op: str) -> bool:
        if cmd.flags:
            raise fail(errno.EOPNOTSUPP, op, self.name, f"flags {cmd.flags:#x}")
        cmd.out_ioas_id = self._add(lambda i: Ioas(i)).id
        return True

    def _iova_ranges(self, cmd: iu.iommu_ioas_iova_ranges, op: str) -> bool:
        if getattr(cmd, "__reserved"):
            raise fail(errno.EOPNOTSUPP, op, self.name, "__reserved is not zero")
        ioas: Ioas = self._get(cmd.ioas_id, Ioas, op)
        ranges = [(0, ULONG_MAX)]
        capacity = cmd.num_iovas
        for i, (start, last) in enumerate(ranges[:capacity]):
            copy_to_user(cmd.allowed_iovas + i * ctypes.sizeof(iu.iommu_iova_range),
                         bytes(iu.iommu_iova_range(start=start, last=last)), op)
        cmd.num_iovas = len(ranges)
        cmd.out_iova_alignment = ioas.alignment
        if capacity < len(ranges):
            mvdata = bytes(cmd)
            raise _RespondThen(mvdata, fail(errno.EMSGSIZE, op, self.name,
                                            f"{len(ranges)} ranges, room for {capacity}"))
        return True

    def _map(self, cmd: iu.iommu_ioas_map, op: str) -> bool:
        known = (iu.IOMMU_IOAS_MAP_FIXED_IOVA | iu.IOMMU_IOAS_MAP_WRITEABLE
                 | iu.IOMMU_IOAS_MAP_READABLE)
        if cmd.flags & ~known or getattr(cmd, "__reserved"):
            raise fail(errno.EOPNOTSUPP, op, self.name, f"flags {cmd.flags:#x}")
        if cmd.iova >= ULONG_MAX or cmd.length >= ULONG_MAX:
            raise fail(errno.EOVERFLOW, op, self.name, "iova or length too large")
        ioas: Ioas = self._get(cmd.ioas_id, Ioas, op)
        fixed = bool(cmd.flags & iu.IOMMU_IOAS_MAP_FIXED_IOVA)
        cmd.iova = ioas.map(cmd.user_va, cmd.length, cmd.iova if fixed else None, cmd.flags,
                            self.kernel, op)
        return True

    def _unmap(self, cmd: iu.iommu_ioas_unmap, op: str) -> bool:
        ioas: Ioas = self._get(cmd.ioas_id, Ioas, op)
        if cmd.iova == 0 and cmd.length == U64_MAX:
            freed, unmapped = ioas.unmap_all()
        else:
            if cmd.iova >= ULONG_MAX or cmd.length >= ULONG_MAX:
                raise fail(errno.EOVERFLOW, op, self.name, "iova or length too large")
            freed, unmapped = ioas.unmap(cmd.iova, cmd.length, op)
        self.kernel.locked_bytes -= freed
        cmd.length = unmapped
        return True

    def _hw_info(self, cmd: iu.iommu_hw_info, op: str) -> bool:
        if cmd.flags or any(getattr(cmd, "__reserved")):
            raise fail(errno.EOPNOTSUPP, op, self.name, "flags or __reserved set")
        idev: Idev = self._get(cmd.dev_id, Idev, op)
        if idev.node.kind == "mdev":
            raise fail(errno.ENOENT, op, self.name, "an emulated device has no IOMMU")
        cmd.data_len = 0
        cmd.out_data_type = iu.IOMMU_HW_INFO_TYPE_NONE
        cmd.out_capabilities = (iu.IOMMU_HW_CAP_DIRTY_TRACKING
                                if idev.node.iommu_dirty_tracking else 0)
        return True

    def _hwpt_alloc(self, cmd: iu.iommu_hwpt_alloc, op: str) -> bool:
        known = iu.IOMMU_HWPT_ALLOC_NEST_PARENT | iu.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
        if cmd.flags & ~(known | iu.IOMMU_HWPT_FAULT_ID_VALID) or getattr(cmd, "__reserved"):
            raise fail(errno.EOPNOTSUPP, op, self.name, f"flags {cmd.flags:#x}")
        if cmd.flags & iu.IOMMU_HWPT_FAULT_ID_VALID:
            raise fail(errno.EOPNOTSUPP, op, self.name, "fault queues are not simulated")
        if not cmd.data_len and cmd.data_type != iu.IOMMU_HWPT_DATA_NONE:
            raise fail(errno.EINVAL, op, self.name, "data_type without data")
        if cmd.data_len or cmd.data_uptr:
            raise fail(errno.EOPNOTSUPP, op, self.name, "nested HWPTs are not simulated")
        idev: Idev = self._get(cmd.dev_id, Idev, op)
        if idev.node.kind == "mdev":
            raise fail(errno.ENOENT, op, self.name, "an emulated device has no IOMMU")
        ioas: Ioas = self._get(cmd.pt_id, Ioas, op)
        dirty = bool(cmd.flags & iu.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
        if dirty and not idev.node.iommu_dirty_tracking:
            raise fail(errno.EOPNOTSUPP, op, idev.node.name,
                       "the device's IOMMU cannot track dirty pages")
        hwpt = self._add(lambda i: Hwpt(i, ioas, dirty_capable=dirty, auto=False))
        assert isinstance(hwpt, Hwpt)
        ioas.hwpts.append(hwpt)
        cmd.out_hwpt_id = hwpt.id
        return True

    def _dirty_hwpt(self, hwpt_id: int, op: str) -> Hwpt:
        hwpt: Hwpt = self._get(hwpt_id, Hwpt, op)
        if not hwpt.dirty_capable:
            raise fail(errno.EOPNOTSUPP, op, self.name, f"HWPT {hwpt_id} was not allocated "
                       "with IOMMU_HWPT_ALLOC_DIRTY_TRACKING")
        return hwpt

    def _set_dirty(self, cmd: iu.iommu_hwpt_set_dirty_tracking, op: str) -> bool:
        if cmd.flags & ~iu.IOMMU_HWPT_DIRTY_TRACKING_ENABLE or getattr(cmd, "__reserved"):
            raise fail(errno.EOPNOTSUPP, op, self.name, f"flags {cmd.flags:#x}")
        hwpt = self._dirty_hwpt(cmd.hwpt_id, op)
        hwpt.set_tracking(bool(cmd.flags & iu.IOMMU_HWPT_DIRTY_TRACKING_ENABLE))
        return False

    def _get_dirty(self, cmd: iu.iommu_hwpt_get_dirty_bitmap, op: str) -> bool:
        if cmd.flags & ~iu.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR or getattr(cmd, "__reserved"):
            raise fail(errno.EOPNOTSUPP, op, self.name, f"flags {cmd.flags:#x}")
        hwpt = self._dirty_hwpt(cmd.hwpt_id, op)
        iova, length, page = cmd.iova, cmd.length, cmd.page_size
        # Unsigned arithmetic as the kernel does it: length 0 makes ``length - 1`` wrap,
        # which overflows for any iova but 0.
        last = iova + ((length - 1) & U64_MAX)
        if last > ULONG_MAX or iova > ULONG_MAX:
            raise fail(errno.EOVERFLOW, op, self.name, f"{iova:#x}+{length:#x} overflows")
        end = (last + 1) & U64_MAX
        align = hwpt.ioas.alignment
        if iova % align or end % align:
            raise fail(errno.EINVAL, op, self.name, f"range not {align:#x}-aligned")
        if not page or page & (page - 1) or page < PAGE_SIZE:
            raise fail(errno.EINVAL, op, self.name, f"page_size {page:#x}: a power of two "
                       f">= {PAGE_SIZE:#x} is needed here")
        if iova % page or end % page:
            raise fail(errno.EINVAL, op, self.name, f"range not aligned to page_size {page:#x}")
        if not hwpt.tracking:
            raise fail(errno.EINVAL, op, self.name, "dirty tracking is not enabled")
        if cmd.data == 0:
            raise fail(errno.EFAULT, op, self.name, "NULL bitmap pointer")
        hwpt.read_dirty(cmd.data, iova, length, page,
                        clear=not cmd.flags & iu.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR, op=op)
        return False


class _RespondThen(Exception):
    """Internal: copy ``data`` back, then fail (IOAS_IOVA_RANGES with too small a buffer)."""

    def __init__(self, data: bytes, err: Exception) -> None:
        super().__init__(str(err))
        self.data = data
        self.err = err
