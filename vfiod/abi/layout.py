"""Layout helpers shared by the ctypes mirrors of <linux/vfio.h> and <linux/iommufd.h>
(docs/kernel-contract.md §0: extensible structs, flexible array tails, capability chains).

* Flexible array members (``areas[]``, ``iova_ranges[]``, ``data[]``) cannot be ctypes
  fields: a struct that ends in one declares ``_flex_ = (name, element_type, offset)`` and
  its ``sizeof`` is the fixed part only. ``flex_size``/``flex_buffer`` build the whole
  buffer; ``flex_array`` views the tail.
* ``offsetofend`` is the kernel's own minimum-size rule: an ioctl accepts
  ``argsz >= offsetofend(struct, last mandatory field)``.
* ``parse_caps`` walks a ``vfio_info_cap_header`` chain with ``struct.unpack_from``:
  before 6.6 capabilities were not padded to 8 bytes, so a header may sit at a 4-byte
  aligned offset, and the chain comes from the kernel (or a peer) and must not be
  trusted to be well formed.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

__all__ = ["FlexStruct", "offsetofend", "flex_size", "flex_buffer", "flex_array",
           "parse_caps", "CAP_HEADER_SIZE"]

#: ``sizeof(struct vfio_info_cap_header)``: id u16, version u16, next u32.
CAP_HEADER_SIZE = 8
_CAP_HEADER = struct.Struct("=HHI")


class FlexStruct(ctypes.Structure):
    """Base of ctypes mirrors whose C struct ends in a flexible array member.

    ``_flex_`` = (C member name, element ctypes type, byte offset of the member). The
    offset is checked against ``offsetof`` from the real headers by tests/abi.
    """

    _flex_: tuple[str, Any, int]


def offsetofend(struct_type: type[ctypes.Structure], field: str) -> int:
    """``offsetofend(struct, field)``: the kernel's minimum ``argsz`` idiom."""
    if field not in {f[0] for f in struct_type._fields_}:
        raise ValueError(f"{struct_type.__name__} has no field {field!r}")
    desc = getattr(struct_type, field)
    return int(desc.offset) + int(desc.size)


def _flex(struct_type: type[FlexStruct]) -> tuple[str, Any, int]:
    flex = getattr(struct_type, "_flex_", None)
    if flex is None:
        raise TypeError(f"{struct_type.__name__} has no flexible array tail")
    return flex


def flex_size(struct_type: type[FlexStruct], count: int) -> int:
    """Total bytes of ``struct_type`` followed by ``count`` tail elements."""
    if count < 0:
        raise ValueError(f"{struct_type.__name__}: negative element count {count}")
    _, elem, offset = _flex(struct_type)
    return max(ctypes.sizeof(struct_type), offset + count * ctypes.sizeof(elem))


def flex_buffer(struct_type: type[FlexStruct], count: int,
                **fields: int) -> tuple[bytearray, FlexStruct]:
    """A zeroed buffer for ``struct_type`` plus ``count`` tail elements, and a ctypes view
    of its fixed part with ``fields`` set. If the struct has an ``argsz`` (VFIO) or
    ``size`` (iommufd) header it is set to the buffer length unless given explicitly."""
    buf = bytearray(flex_size(struct_type, count))
    head = struct_type.from_buffer(buf)
    names = {f[0] for f in struct_type._fields_}
    first = struct_type._fields_[0][0]
    if first in ("argsz", "size") and first not in fields:
        fields = {first: len(buf), **fields}
    for name, value in fields.items():
        if name not in names:
            raise ValueError(f"{struct_type.__name__} has no field {name!r}")
        setattr(head, name, value)
    return buf, head


def flex_array(struct_type: type[FlexStruct], buf: bytearray | memoryview | bytes,
               count: int, base: int = 0) -> ctypes.Array[Any]:
    """The ``count`` tail elements of a ``struct_type`` that starts at ``base`` in ``buf``.
    A writable buffer gives a live view; ``bytes`` gives a copy. Raises ValueError if the
    buffer is too short, naming the struct and both sizes."""
    name, elem, offset = _flex(struct_type)
    need = base + offset + count * ctypes.sizeof(elem)
    if count < 0 or need > len(buf):
        raise ValueError(f"{struct_type.__name__}.{name}[{count}] at offset {base} needs "
                         f"{need} bytes, buffer has {len(buf)}")
    array_type = elem * count
    if isinstance(buf, bytes):
        return array_type.from_buffer_copy(buf, base + offset)
    return array_type.from_buffer(buf, base + offset)


def parse_caps(buf: bytes | bytearray | memoryview, first_offset: int,
               header_size: int = 0) -> list[tuple[int, int, int]]:
    """Walk a capability chain starting at ``first_offset`` (0 = no capabilities).

    Returns ``[(id, version, offset), ...]`` in chain order. Offsets are relative to the
    start of ``buf`` (the info struct), must be 4-byte aligned (every capability is a
    multiple of 4 bytes; 8-byte alignment only holds from 6.6 on), must not point into
    the fixed info struct (``header_size``) and must leave room for the 8-byte header.
    A loop or a bad offset raises ValueError naming the offset.
    """
    caps: list[tuple[int, int, int]] = []
    seen: set[int] = set()
    offset = first_offset
    while offset != 0:
        if offset in seen:
            raise ValueError(f"capability chain loops back to offset {offset}")
        if offset % 4:
            raise ValueError(f"capability offset {offset} is not 4-byte aligned")
        if offset < header_size:
            raise ValueError(f"capability offset {offset} lies inside the "
                             f"{header_size}-byte info struct")
        if offset < 0 or offset + CAP_HEADER_SIZE > len(buf):
            raise ValueError(f"capability offset {offset} is outside the "
                             f"{len(buf)}-byte buffer")
        seen.add(offset)
        cap_id, version, nxt = _CAP_HEADER.unpack_from(buf, offset)
        caps.append((cap_id, version, offset))
        offset = nxt
    return caps
