"""Migration v1 ``device_state`` bitmask ⇄ ``MigState``, and the register block's layout
(docs/kernel-contract.md §5.2, §5.3).

v1 has no enum: the state is three bits (_RESUMING _SAVING _RUNNING) of a 32-bit register
whose bits 3–31 are reserved and must survive every write (read-modify-write). vfiod keeps
one state vocabulary (docs/architecture.md §2), so the bits are decoded into the v2 values:

    000 STOP   001 RUNNING   010 STOP_COPY   011 PRE_COPY   100 RESUMING   110 ERROR

101 and 111 are invalid (``ValueError`` naming the bits). P2P states do not exist in v1.

Field offsets and widths come from the ctypes mirror ``vfio_device_migration_info``: the
driver accepts each field only as one access of its exact width at its natural offset.
"""

from __future__ import annotations

import struct
from typing import Final

from vfiod.abi.v1 import (
    V1_STATE_ERROR,
    V1_STATE_MASK,
    V1_STATE_RESUMING,
    V1_STATE_RUNNING,
    V1_STATE_SAVING,
    V1_STATE_STOP,
    vfio_device_migration_info,
)
from vfiod.migration.states import MigState

__all__ = [
    "FIELDS", "Field", "encode", "decode", "bits_name", "state_of", "with_state",
    "pack_field", "unpack_field",
]

_ENCODE: Final[dict[MigState, int]] = {
    MigState.STOP: V1_STATE_STOP,
    MigState.RUNNING: V1_STATE_RUNNING,
    MigState.STOP_COPY: V1_STATE_SAVING,
    MigState.PRE_COPY: V1_STATE_SAVING | V1_STATE_RUNNING,
    MigState.RESUMING: V1_STATE_RESUMING,
    MigState.ERROR: V1_STATE_ERROR,
}
_DECODE: Final[dict[int, MigState]] = {bits: st for st, bits in _ENCODE.items()}

_BIT_NAMES = ((V1_STATE_RESUMING, "RESUMING"), (V1_STATE_SAVING, "SAVING"),
              (V1_STATE_RUNNING, "RUNNING"))


def bits_name(bits: int) -> str:
    """``0b101 (RESUMING|RUNNING)``-style rendering of the three state bits."""
    b = bits & V1_STATE_MASK
    names = "|".join(n for bit, n in _BIT_NAMES if b & bit) or "STOP"
    return f"0b{b:03b} ({names})"


def encode(state: MigState | int) -> int:
    """The three v1 bits for ``state``. P2P states have no v1 form: ValueError."""
    try:
        return _ENCODE[MigState(state)]
    except (KeyError, ValueError):
        raise ValueError(f"migration state {state!r} has no v1 device_state encoding "
                         f"(v1 knows {', '.join(s.name for s in _ENCODE)})") from None


def decode(bits: int) -> MigState:
    """The state the low three bits of ``bits`` mean (reserved bits ignored).
    101 and 111 are invalid (RESUMING may not be combined with RUNNING): ValueError."""
    try:
        return _DECODE[bits & V1_STATE_MASK]
    except KeyError:
        raise ValueError(f"v1 device_state {bits_name(bits)} is invalid: "
                         "RESUMING cannot be combined with RUNNING") from None


def state_of(register: int) -> MigState:
    """Decode a full 32-bit device_state register value."""
    return decode(register)


def with_state(register: int, state: MigState | int) -> int:
    """``register`` with its three state bits replaced by ``state``'s, reserved bits 3–31
    kept as read (the read-modify-write the header asks for)."""
    if not 0 <= register <= 0xFFFFFFFF:
        raise ValueError(f"device_state register {register:#x} is not a 32-bit value")
    return (register & ~V1_STATE_MASK & 0xFFFFFFFF) | encode(state)


class Field:
    """One field of the register block: its offset and exact access width."""

    __slots__ = ("name", "offset", "size", "_fmt")

    def __init__(self, name: str) -> None:
        desc = getattr(vfio_device_migration_info, name)
        self.name = name
        self.offset: int = desc.offset
        self.size: int = desc.size
        self._fmt = {4: "=I", 8: "=Q"}[self.size]   # native endian, as the C struct

    def pack(self, value: int) -> bytes:
        if not 0 <= value < 1 << (8 * self.size):
            raise ValueError(f"{self.name}={value:#x} does not fit {self.size} bytes")
        return struct.pack(self._fmt, value)

    def unpack(self, raw: bytes) -> int:
        if len(raw) != self.size:
            raise ValueError(f"{self.name}: expected {self.size} bytes, got {len(raw)}")
        return int(struct.unpack(self._fmt, raw)[0])

    def __repr__(self) -> str:
        return f"Field({self.name}@{self.offset}, {self.size} bytes)"


#: The fields vfiod touches, by name (``reserved`` is never accessed).
FIELDS: Final[dict[str, Field]] = {
    n: Field(n) for n in ("device_state", "pending_bytes", "data_offset", "data_size")
}


def pack_field(name: str, value: int) -> bytes:
    return FIELDS[name].pack(value)


def unpack_field(name: str, raw: bytes) -> int:
    return FIELDS[name].unpack(raw)
