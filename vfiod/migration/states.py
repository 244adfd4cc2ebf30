"""The state vocabulary of a migration: device, guest and migration states.

One ``MigState`` enum (the kernel's ``enum vfio_device_mig_state``, docs/kernel-contract.md §6.4)
serves logs, metrics and the CLI for both protocols; the v1 bitmask (docs/kernel-contract.md §5.3) is
decoded into the same values by ``vfiod.migration.device.v1_codec``.

Status shows the triple (guest run state, migration state, device state) in the vocabulary
of the seed's flow diagram (docs/architecture.md §1), e.g. ``(RUNNING, ACTIVE, RUNNING|SAVING)`` while
pre-copying and ``(FINISH_MIGRATE, DEVICE, SAVING)`` in stop-and-copy
(``session.status.triple`` writes it). The device part (``device_label``) is written in
v1 bit names because that diagram is the operators' reference; v2-only states
say so (``RUNNING_P2P``, ``RUNNING_P2P|SAVING``).
"""

from __future__ import annotations

import enum

#: The one device-state enum (``vfio_device_mig_state``: the kernel's v2 values).
from vfiod.abi.vfio import MigState

__all__ = ["MigState", "GuestState", "MigrationState", "device_label"]


class GuestState(enum.Enum):
    """Run state of the guest a device belongs to (QEMU's run-state names)."""

    RUNNING = "running"
    PAUSED = "paused"                  # stopped by the operator, not by migration
    INMIGRATE = "inmigrate"            # destination: receiving, not yet started
    FINISH_MIGRATE = "finish-migrate"  # source: stopped for stop-and-copy
    POSTMIGRATE = "postmigrate"        # source: migrated away, stays stopped
    SHUTDOWN = "shutdown"


class MigrationState(enum.Enum):
    """State of one migration (QEMU's MIGRATION_STATUS names, without the prefix)."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"            # pre-copy iterations
    DEVICE = "device"            # stop-and-copy: guest stopped, device state moving
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    #: committed (source) or prepared (destination), and the peer's word on the outcome
    #: has not arrived: nothing may resume or discard on its own (docs/architecture.md §1.7)
    UNSETTLED = "unsettled"

    @property
    def finished(self) -> bool:
        return self in (MigrationState.COMPLETED, MigrationState.FAILED,
                        MigrationState.CANCELLED)


# The seed diagram's device column: v1 bit names (_RUNNING, _SAVING, _RESUMING, _STOP).
_LABELS: dict[MigState, str] = {
    MigState.ERROR: "ERROR",
    MigState.STOP: "STOP",
    MigState.RUNNING: "RUNNING",
    MigState.STOP_COPY: "SAVING",
    MigState.RESUMING: "RESUMING",
    MigState.RUNNING_P2P: "RUNNING_P2P",
    MigState.PRE_COPY: "RUNNING|SAVING",
    MigState.PRE_COPY_P2P: "RUNNING_P2P|SAVING",
}


def device_label(state: MigState | int | None) -> str:
    """The device state as the flow diagram writes it; ``-`` when unknown.

    Raises ValueError for a number that is no ``vfio_device_mig_state`` value.
    """
    if state is None:
        return "-"
    try:
        member = MigState(state)
    except ValueError:
        raise ValueError(f"device state {state!r} is not a vfio_device_mig_state value "
                         f"(0..{len(MigState) - 1})") from None
    return _LABELS[member]
