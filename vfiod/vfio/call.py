"""The one way the vfio layer issues a syscall: through ``KernelOps``, named for errors.

Every failure leaves here as ``KernelError`` whose ``op`` is the kernel's request name
(plus the sub-operation, e.g. ``VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE PRE_COPY)``) and
whose ``target`` is the VFIO object (device name, ``group 12``, the container path), so a
message reads ``VFIO_IOMMU_MAP_DMA on container /dev/vfio/vfio: EEXIST`` whichever backend
raised it (docs/architecture.md §2 "Errors"). Also the shared checks on caller-supplied numbers
(docs/kernel-contract.md §0: every field is a fixed-width unsigned integer), and ``OwnedFd``, the
close-once life of every fd a vfio object owns.
"""

from __future__ import annotations

import ctypes
import errno
from typing import Any, Self, TypeVar

from vfiod.abi.layout import FlexStruct, flex_array, parse_caps
from vfiod.errors import KernelError
from vfiod.kernel.ops import Buffer, KernelOps

U64_MAX = (1 << 64) - 1


def ioctl(kernel: KernelOps, fd: int, request: int, arg: int | Buffer, op: str,
          target: str) -> int:
    """``kernel.ioctl`` with ``op``/``target`` on any failure (the errno is kept)."""
    try:
        return kernel.ioctl(fd, request, arg, label=op, target=target)
    except KernelError as e:
        raise e.with_context(op=op, target=target) from None


class OwnedFd:
    """An fd a vfio object owns: ``close`` releases it once (what must go first, e.g. a
    container's groups, goes in ``_close_members``), and leaving a ``with`` block closes.

    Teardown finishes every step even if one fails and raises the first failure afterwards,
    named after this object.
    """

    def __init__(self, kernel: KernelOps, fd: int, name: str) -> None:
        self.kernel = kernel
        self.fd = fd
        self.name = name
        self.closed = False

    def _close_members(self) -> KernelError | None:
        """Close what depends on this fd and must be closed before it; return the first
        failure (nothing by default)."""
        return None

    def close(self) -> None:
        if self.closed:
            return
        first = self._close_members()
        self.closed = True
        try:
            self.kernel.close(self.fd)
        except KernelError as e:
            first = first or e.with_context(op="close", target=self.name)
        if first is not None:
            raise first

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def renamed(err: KernelError, op: str, target: str) -> KernelError:
    """``err`` re-labelled for this layer (keeps errno and detail)."""
    return err.with_context(op=op, target=target)


def check_uint(name: str, value: int, bits: int = 64) -> int:
    """Reject what a C ``__u{bits}`` field cannot hold instead of letting ctypes wrap it."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0 or value >= 1 << bits:
        raise ValueError(f"{name}={value:#x} does not fit an unsigned {bits}-bit field")
    return value


def caps_of(buf: bytes | bytearray | memoryview, first: int, header_size: int, op: str,
            target: str) -> list[tuple[int, int, int]]:
    """Walk a capability chain the kernel returned; a malformed chain is a KernelError
    (EPROTO) naming the ioctl, since it is the kernel's answer that is wrong."""
    try:
        return parse_caps(buf, first, header_size)
    except ValueError as e:
        raise KernelError(errno.EPROTO, op, target, f"bad capability chain: {e}") from None


def lowest_bit(mask: int) -> int:
    """The smallest page size in a page-size bitmap (0 if none)."""
    return mask & -mask


S = TypeVar("S", bound=ctypes.Structure)


def struct_at(struct_type: type[S], data: bytes, off: int, op: str, target: str) -> S:
    """A copy of ``struct_type`` at ``off`` in a kernel answer (unaligned is fine: pre-6.6
    capabilities sit at 4-byte offsets); an overrun is the kernel's fault (EPROTO)."""
    size = ctypes.sizeof(struct_type)
    if off < 0 or off + size > len(data):
        raise KernelError(errno.EPROTO, op, target,
                          f"{struct_type.__name__} at offset {off} overruns the "
                          f"{len(data)}-byte answer")
    return struct_type.from_buffer_copy(data, off)


def tail_at(struct_type: type[FlexStruct], data: bytes, count: int, off: int, op: str,
            target: str) -> ctypes.Array[Any]:
    """The ``count`` flexible-array elements of ``struct_type`` at ``off`` (a copy)."""
    try:
        return flex_array(struct_type, data, count, base=off)
    except ValueError as e:
        raise KernelError(errno.EPROTO, op, target, str(e)) from None
