"""The one interface the session uses for a device's state, whichever protocol the kernel
offers (docs/architecture.md §1.4–§1.6; docs/kernel-contract.md §5 v1, §6 v2): ``MigrationDriver`` and the
small types its hooks speak in.

The hook names are the seed's vocabulary (docs/architecture.md §1): a source runs
``save_setup → (save_live_pending, save_live_iterate)* → [quiesce_p2p] →
save_live_complete_precopy → cleanup``; a destination runs ``load_setup → load_state* →
load_complete → resume → cleanup``. ``save_state`` is a small identity record the
destination checks with ``check_state`` before loading. ``rollback`` puts a source back to
RUNNING from any point (a destination: discards the partial state by reset).

The session branches on capabilities (``has_precopy``, ``has_p2p``), never on ``protocol``,
which is for display only; what callers need to show or compare about a device
(``migration_flags``, ``capability_names``, ``rollback_log``) every driver answers.

Data chunks reach the caller through a ``DeviceDataSink``. A chunk may be a memoryview of a
buffer the driver reuses: the sink must consume or copy it before returning. Each sink call
is one device record; the destination must hand the same chunks, in order, to
``load_state`` (v1 requires identical chunk sizes; v2 does not care).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vfiod.migration.states import MigState

__all__ = ["DeviceDataSink", "Pending", "HookPhase", "MigrationDriver"]

#: Receives device data in order; must consume/copy the chunk before returning.
DeviceDataSink = Callable[[bytes | memoryview], None]


@dataclass(frozen=True)
class Pending:
    """What a device still has to send (``save_live_pending``).

    ``precopy_bytes``: readable now, while the guest runs. ``stopcopy_bytes``: what the
    device will produce after it stops. ``exact``: both come from the driver (v2
    PRECOPY_INFO + MIG_DATA_SIZE); False when any part is an estimate."""

    precopy_bytes: int
    stopcopy_bytes: int
    exact: bool


class HookPhase(enum.Enum):
    """Where a driver is in the hook sequence (hooks called out of order are refused)."""

    IDLE = "idle"                # not migrating (fresh, after rollback or cleanup)
    SAVING = "saving"            # save_setup done: pre-copy iterations
    QUIESCED = "quiesced"        # quiesce_p2p done: no new P2P DMA
    SAVED = "saved"              # save_live_complete_precopy read the stream to its end
    LOADING = "loading"          # load_setup done: state chunks go in
    LOADED = "loaded"            # load_complete done: the driver accepted the stream
    RESUMED = "resumed"          # resume done: destination device RUNNING


@runtime_checkable
class MigrationDriver(Protocol):
    """One device's migration, protocol hidden. See the module docstring for the order."""

    @property
    def device_name(self) -> str: ...
    @property
    def protocol(self) -> str:
        """"v2" or "v1" — for display only; branch on capabilities."""
        ...
    @property
    def has_precopy(self) -> bool: ...
    @property
    def has_p2p(self) -> bool: ...
    @property
    def migration_flags(self) -> int:
        """The VFIO_MIGRATION_* bits the kernel offers (v2); 0 for v1, which has none."""
        ...
    @property
    def capability_names(self) -> tuple[str, ...]:
        """The device's migration capabilities as the stream header and ``vfiod check``
        name them: the VFIO_MIGRATION_* bits (v2) or ``V1_REGION``."""
        ...
    @property
    def phase(self) -> HookPhase: ...
    @property
    def rollback_log(self) -> tuple[str, ...]:
        """What the last ``rollback`` did, rung by rung (empty before the first)."""
        ...

    def state(self) -> MigState:
        """The device state as last set or read (no syscall; safe for status)."""
        ...

    # -- source ---------------------------------------------------------------------------
    def save_setup(self) -> None:
        """Open the saving session: pre-copy if offered and the device is RUNNING."""
        ...
    def save_live_pending(self) -> Pending: ...
    def save_live_iterate(self, sink: DeviceDataSink, max_bytes: int) -> int:
        """Read up to about ``max_bytes`` of pre-copy data now available; returns bytes
        read. 0 means "nothing now", never "finished"."""
        ...
    def quiesce_p2p(self) -> None:
        """Stop initiating P2P DMA (RUNNING_P2P / PRE_COPY_P2P) before any device of the
        guest stops. Only when every device of the guest has ``has_p2p``."""
        ...
    def save_live_complete_precopy(self, sink: DeviceDataSink) -> int:
        """Stop the device and read its final state to the end; returns bytes read."""
        ...
    def save_state(self) -> bytes:
        """The identity record (name, protocol, flags) for ``check_state``."""
        ...

    # -- destination ----------------------------------------------------------------------
    def check_state(self, record: bytes | memoryview) -> None:
        """Raise DeviceMismatch if this device cannot load the recorded device's state."""
        ...
    def load_setup(self) -> None: ...
    def load_state(self, chunk: bytes | memoryview) -> None: ...
    def load_complete(self) -> None:
        """End the resuming session; the kernel driver validates the state here."""
        ...
    def resume(self) -> None: ...

    # -- both -------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Release the data session (idempotent); a completed source goes to STOP."""
        ...
    def rollback(self) -> MigState:
        """Back to RUNNING from wherever the device is (recovery ladder, reset last);
        returns the final state (RUNNING) or raises DeviceTransitionError. A destination
        (after load_setup) is reset: what it loaded is discarded, never run."""
        ...
