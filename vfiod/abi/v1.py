"""Migration protocol v1: the register block at the start of the v1 migration region
(docs/kernel-contract.md §5). Mirrors ``struct vfio_device_migration_info`` from <linux/vfio.h>,
which 5.18+ headers keep only as a deprecated stub.

The state-bit names are OURS (``V1_STATE_*``): the header's names changed meaning in 5.18
(``VFIO_DEVICE_STATE_STOP``/``_RUNNING`` were v1 bits 0/1 before and are v2 enum values
1/2 after; the v1 bits became ``VFIO_DEVICE_STATE_V1_*``). tests/abi checks ours against
the ``_V1_`` macros and ``VFIO_DEVICE_STATE_MASK`` of real headers.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint32, c_uint64

#: Region type/subtype of the v1 migration region (the TYPE capability, §5.1).
VFIO_REGION_TYPE_MIGRATION_DEPRECATED = 3
VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED = 1

V1_STATE_STOP = 0
V1_STATE_RUNNING = 1 << 0
V1_STATE_SAVING = 1 << 1
V1_STATE_RESUMING = 1 << 2
V1_STATE_MASK = V1_STATE_RUNNING | V1_STATE_SAVING | V1_STATE_RESUMING
#: SAVING|RESUMING: set only by the driver; only VFIO_DEVICE_RESET leaves it.
V1_STATE_ERROR = V1_STATE_SAVING | V1_STATE_RESUMING


class vfio_device_migration_info(ctypes.Structure):
    """32 bytes at region offset 0. Each field must be accessed with one access of its
    own width at its own offset (a pread of 4 or 8 bytes), never as a whole."""
    _fields_ = [("device_state", c_uint32), ("reserved", c_uint32),
                ("pending_bytes", c_uint64), ("data_offset", c_uint64),
                ("data_size", c_uint64)]


def v1_state_valid(state: int) -> bool:
    """The header's VALID rule: with RESUMING set, no other state bit may be set.
    Bits above the mask are reserved and ignored here (callers read-modify-write)."""
    if state & V1_STATE_RESUMING:
        return (state & V1_STATE_MASK) == V1_STATE_RESUMING
    return True


def v1_state_is_error(state: int) -> bool:
    """The header's IS_ERROR rule: SAVING|RESUMING (and not RUNNING)."""
    return (state & V1_STATE_MASK) == V1_STATE_ERROR
