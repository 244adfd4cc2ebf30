"""How the simulated kernel reads and answers a caller's ioctl argument (docs/kernel-contract.md §0).

The real kernel copies ``min(argsz, what it knows)`` bytes of an extensible struct from the
caller, checks a minimum size, and copies back only the fields it answers. These helpers do
the same against the caller's buffer, parsing it with the ``vfiod.abi`` ctypes structs so a
layout bug shows up as a wrong answer. A buffer shorter than what the kernel must read or
write is ``EFAULT`` (the kernel would touch memory the caller does not own).

Capability chains (§3.4, §3.6) are assembled here too: both ``VFIO_IOMMU_GET_INFO`` and
``VFIO_DEVICE_GET_REGION_INFO`` use the same two-call pattern.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from typing import TYPE_CHECKING, TypeVar

from vfiod.kernel.sim.base import arg_bytes, fail

if TYPE_CHECKING:
    from vfiod.kernel.ops import Buffer

S = TypeVar("S", bound=ctypes.Structure)

#: x86-64 user address space ends here (TASK_SIZE_MAX with 4-level paging).
TASK_SIZE = 1 << 47
U64_MAX = (1 << 64) - 1
_CAP_NEXT = struct.Struct("=I")


def arg_view(arg: int | Buffer, op: str, target: str) -> memoryview:
    """The caller's argument buffer as writable bytes. An ``int`` where the kernel expects
    a pointer is refused with EFAULT: the simulator never dereferences a bare number."""
    if isinstance(arg, int):
        raise fail(errno.EFAULT, op, target, "argument passed by value; this ioctl takes a "
                   "pointer to a struct (pass a ctypes object or bytearray)")
    mv = arg_bytes(arg)
    if mv.readonly:
        raise fail(errno.EFAULT, op, target, "argument buffer is read-only")
    return mv


def copy_in(mv: memoryview, struct_type: type[S], op: str, target: str,
            offset: int = 0, need: int | None = None) -> S:
    """``copy_from_user`` of ``struct_type`` at ``offset``: ``need`` bytes (default the
    whole struct) must be inside the caller's buffer; bytes beyond it read as zero."""
    size = ctypes.sizeof(struct_type)
    need = size if need is None else need
    if offset + need > len(mv):
        raise fail(errno.EFAULT, op, target,
                   f"{struct_type.__name__} needs {need} bytes at offset {offset}, "
                   f"argument buffer has {len(mv)}")
    take = max(0, min(size, len(mv) - offset))
    data = bytes(mv[offset:offset + take]).ljust(size, b"\0")
    return struct_type.from_buffer_copy(data)


def copy_out(mv: memoryview, obj: ctypes.Structure | bytes, length: int, op: str,
             target: str, offset: int = 0) -> None:
    """``copy_to_user`` of the first ``length`` bytes of ``obj`` at ``offset``."""
    data = bytes(obj)[:length]
    if offset + len(data) > len(mv):
        raise fail(errno.EFAULT, op, target,
                   f"answer of {len(data)} bytes at offset {offset} overruns the "
                   f"{len(mv)}-byte argument buffer")
    mv[offset:offset + len(data)] = data


def read_u32(mv: memoryview, op: str, target: str, offset: int = 0) -> int:
    if offset + 4 > len(mv):
        raise fail(errno.EFAULT, op, target, "argument buffer shorter than 4 bytes")
    return int(_CAP_NEXT.unpack_from(mv, offset)[0])


def user_range_ok(addr: int, size: int) -> bool:
    """``access_ok``: the range lies in user address space (it may still be unmapped)."""
    return 0 <= addr and 0 <= size and addr + size <= TASK_SIZE


def chain_caps(caps: list[bytes], base: int, align8: bool) -> bytes:
    """Concatenate capabilities (each starting with ``vfio_info_cap_header``, ``next`` 0)
    into one chain placed at ``base`` of the info buffer, with ``next`` offsets relative to
    the buffer start. Since 6.6 the kernel pads every capability to 8 bytes; before, a
    capability could end (and the next start) on a 4-byte boundary."""
    out = bytearray()
    starts: list[int] = []
    for cap in caps:
        starts.append(len(out))
        out += cap
        pad = (-len(out)) % (8 if align8 else 4)
        out += b"\0" * pad
    for i, start in enumerate(starts):
        nxt = base + starts[i + 1] if i + 1 < len(starts) else 0
        _CAP_NEXT.pack_into(out, start + 4, nxt)
    return bytes(out)
