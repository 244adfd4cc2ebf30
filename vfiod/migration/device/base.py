"""Migration drivers: the one interface the session uses for a device's state, whichever
protocol the kernel offers (design.md §1.4–§1.6; vfio-uapi.md §5 v1, §6 v2).

The hook names are the seed's vocabulary (design.md §1): a source runs
``save_setup → (save_live_pending, save_live_iterate)* → [quiesce_p2p] →
save_live_complete_precopy → cleanup``; a destination runs ``load_setup → load_state* →
load_complete → resume → cleanup``. ``save_state`` is a small identity record the
destination checks with ``check_state`` before loading. ``rollback`` puts a source back to
RUNNING from any point (a destination: discards the partial state by reset).

The session branches on capabilities (``has_precopy``, ``has_p2p``), never on ``protocol``,
which is for display only. ``probe(device)`` picks the driver: v2 (``VFIO_DEVICE_FEATURE
MIGRATION`` GET answers), else v1 (a region of type 3 subtype 1), else ``NotMigratable``
with the concrete reason.

Data chunks reach the caller through ``sink(chunk)``. A chunk may be a memoryview of a
buffer the driver reuses: the sink must consume or copy it before returning. Each sink call
is one device record; the destination must hand the same chunks, in order, to
``load_state`` (v1 requires identical chunk sizes; v2 does not care).
"""

from __future__ import annotations

import enum
import errno
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, Protocol, runtime_checkable

from vfiod.abi.v1 import (
    VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED,
    VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
)
from vfiod.abi.vfio import VFIO_MIGRATION_STOP_COPY
from vfiod.errors import KernelError, NotMigratable, ProtocolError, VfiodError
from vfiod.migration.states import MigState

if TYPE_CHECKING:
    from vfiod.vfio.device import Device

__all__ = [
    "Sink", "Pending", "MigrationDriver", "Phase", "HookOrderError", "DeviceMismatch",
    "ForbiddenTransition", "DeviceTransitionError", "DriverBase", "encode_record",
    "decode_record", "compare_records", "probe",
]

#: Receives device data in order; must consume/copy the chunk before returning.
Sink = Callable[[bytes | memoryview], None]


@dataclass(frozen=True)
class Pending:
    """What a device still has to send (``save_live_pending``).

    ``precopy_bytes``: readable now, while the guest runs. ``stopcopy_bytes``: what the
    device will produce after it stops. ``exact``: both come from the driver (v2
    PRECOPY_INFO + MIG_DATA_SIZE); False when any part is an estimate."""

    precopy_bytes: int
    stopcopy_bytes: int
    exact: bool


class Phase(enum.Enum):
    """Where a driver is in the hook sequence (hooks called out of order are refused)."""

    IDLE = "idle"                # not migrating (fresh, after rollback or cleanup)
    SAVING = "saving"            # save_setup done: pre-copy iterations
    QUIESCED = "quiesced"        # quiesce_p2p done: no new P2P DMA
    SAVED = "saved"              # save_live_complete_precopy read the stream to its end
    LOADING = "loading"          # load_setup done: state chunks go in
    LOADED = "loaded"            # load_complete done: the driver accepted the stream
    RESUMED = "resumed"          # resume done: destination device RUNNING


class HookOrderError(VfiodError, RuntimeError):
    """A hook was called in a phase where it makes no sense (a session bug)."""

    def __init__(self, device: str, hook: str, phase: Phase, expected: Iterable[Phase]) -> None:
        self.device, self.hook, self.phase = device, hook, phase
        exp = ", ".join(p.name for p in expected)
        super().__init__(f"{hook} on {device}: called in phase {phase.name}; allowed in {exp}")


class ForbiddenTransition(VfiodError, RuntimeError):
    """A driver was asked for a transition that must never reach the kernel
    (STOP_COPY -> PRE_COPY/PRE_COPY_P2P hangs kernels 6.2+): a caller bug."""


class DeviceMismatch(VfiodError):
    """The destination device cannot take the source device's state; lists every reason."""

    def __init__(self, device: str, reasons: list[str]) -> None:
        self.device = device
        self.reasons = list(reasons)
        super().__init__(f"{device}: cannot load the source device's state: "
                         + "; ".join(self.reasons))


class DeviceTransitionError(KernelError):
    """A device state change failed; says what happened at each rung of the recovery
    ladder (target, read back, recovery state, reset) and keeps the first errno.

    ``final`` is the state the device was left in (None if it could not be read back),
    ``reset`` whether VFIO_DEVICE_RESET was used."""

    def __init__(self, err: int, op: str, target: str, rungs: list[str],
                 final: MigState | None, reset: bool) -> None:
        super().__init__(err, op, target, "; ".join(rungs))
        self.rungs = list(rungs)
        self.final = final
        self.reset = reset

    def __reduce__(self) -> tuple[object, ...]:
        return (DeviceTransitionError,
                (self.errno, self.op, self.target, self.rungs, self.final, self.reset))


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
    def phase(self) -> Phase: ...
    #: the recovery rungs the latest ``rollback`` took (for the result)
    rollback_log: list[str]

    def state(self) -> MigState:
        """The device state as last set or read (no syscall; safe for status)."""
        ...

    # -- source ---------------------------------------------------------------------------
    def save_setup(self) -> None:
        """Open the saving session: pre-copy if offered and the device is RUNNING."""
        ...
    def save_live_pending(self) -> Pending: ...
    def save_live_iterate(self, sink: Sink, max_bytes: int) -> int:
        """Read up to about ``max_bytes`` of pre-copy data now available; returns bytes
        read. 0 means "nothing now", never "finished"."""
        ...
    def quiesce_p2p(self) -> None:
        """Stop initiating P2P DMA (RUNNING_P2P / PRE_COPY_P2P) before any device of the
        guest stops. Only when every device of the guest has ``has_p2p``."""
        ...
    def save_live_complete_precopy(self, sink: Sink) -> int:
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


# -- the identity record (save_state / check_state) ------------------------------------------
_RECORD_KEY = "vfiod_device_record"
_RECORD_VERSION = 1
_RECORD_MAX = 4096


def encode_record(name: str, protocol: str, flags: int, **extra: int | str | bool) -> bytes:
    rec: dict[str, object] = {_RECORD_KEY: _RECORD_VERSION, "name": name,
                              "protocol": protocol, "flags": flags}
    rec.update(extra)
    return json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()


def decode_record(record: bytes | memoryview) -> dict[str, object]:
    raw = bytes(record)
    if len(raw) > _RECORD_MAX:
        raise ProtocolError(f"device record: {len(raw)} bytes, more than {_RECORD_MAX}")
    try:
        rec = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"device record: not a vfiod device record ({e})") from None
    if not isinstance(rec, dict) or rec.get(_RECORD_KEY) != _RECORD_VERSION:
        raise ProtocolError(f"device record: missing {_RECORD_KEY}={_RECORD_VERSION}")
    for key, typ in (("name", str), ("protocol", str), ("flags", int)):
        if not isinstance(rec.get(key), typ):
            raise ProtocolError(f"device record: field {key!r} missing or not {typ.__name__}")
    return rec


def compare_records(mine: dict[str, object], theirs: dict[str, object]) -> list[str]:
    """Reasons the source device (``theirs``) cannot be loaded into this one (``mine``).
    Device names differ between hosts and are not compared."""
    reasons = []
    for key in sorted(set(mine) | set(theirs)):
        if key in (_RECORD_KEY, "name"):
            continue
        a, b = theirs.get(key), mine.get(key)
        if a != b:
            fa = f"{a:#x}" if key == "flags" and isinstance(a, int) else repr(a)
            fb = f"{b:#x}" if key == "flags" and isinstance(b, int) else repr(b)
            reasons.append(f"{key}: source {theirs.get('name')} has {fa}, "
                           f"destination {mine.get('name')} has {fb}")
    return reasons


# -- shared by both drivers -------------------------------------------------------------------
class DriverBase:
    """Phase bookkeeping, the identity record and the recovery ladder, common to the v1
    and v2 drivers. A driver supplies ``_VERB`` (how its state changes are named in the
    ladder's rungs), ``_apply`` (change the state), ``_read_back`` and ``_reset``."""

    protocol: str = ""
    _VERB = "SET"

    def _apply(self, state: MigState) -> None:
        raise NotImplementedError

    def _read_back(self, rungs: list[str]) -> MigState | None:
        raise NotImplementedError

    def _reset(self, rungs: list[str]) -> MigState | None:
        raise NotImplementedError

    def _recovery_refused(self, actual: MigState, recover: MigState) -> str | None:
        """Why ``recover`` must not be requested from ``actual`` (None: it may be)."""
        return None

    def _ladder(self, err: KernelError, target: MigState,
                recover: MigState | None) -> NoReturn:
        """After a failed change to ``target``: read back; if the device is neither there
        nor in ERROR, change to ``recover``; reset when that fails, when there is no
        recovery state, or in ERROR (design.md §1.6). Raises with every rung taken."""
        verb = self._VERB
        rungs = [f"{verb} {target.name}: {err.errno_name}"]
        actual = final = self._read_back(rungs)
        need_reset = actual is None or actual is MigState.ERROR
        if actual is target:
            rungs.append(f"device reached {target.name} despite the error")
        elif actual is not None and not need_reset:
            refused = None if recover is None else self._recovery_refused(actual, recover)
            if recover is None:
                need_reset = True
            elif actual is recover:
                rungs.append(f"already in recovery state {recover.name}")
            elif refused is not None:
                rungs.append(refused)
                need_reset = True
            else:
                try:
                    self._apply(recover)
                    rungs.append(f"{verb} {recover.name} (recovery): ok")
                    final = recover
                except KernelError as e2:
                    rungs.append(f"{verb} {recover.name} (recovery): {e2.errno_name}")
                    final = self._read_back(rungs)
                    need_reset = final is not recover
        if need_reset:
            final = self._reset(rungs)
        raise DeviceTransitionError(err.errno or errno.EIO, err.op,
                                    err.target or self.device.name, rungs, final,
                                    need_reset) from None

    def __init__(self, device: Device, flags: int) -> None:
        self.device = device
        self.flags = flags
        self._phase = Phase.IDLE
        self._state = MigState.RUNNING      # replaced by the first read back

    @property
    def device_name(self) -> str:
        return self.device.name

    @property
    def phase(self) -> Phase:
        return self._phase

    def state(self) -> MigState:
        return self._state

    def _expect(self, hook: str, *allowed: Phase) -> None:
        if self._phase not in allowed:
            raise HookOrderError(self.device.name, hook, self._phase, allowed)

    def _record_fields(self) -> dict[str, int | str | bool]:
        """Extra identity fields a protocol adds (compared on the destination)."""
        return {}

    def save_state(self) -> bytes:
        return encode_record(self.device.name, self.protocol, self.flags,
                             **self._record_fields())

    def check_state(self, record: bytes | memoryview) -> None:
        theirs = decode_record(record)
        mine = decode_record(self.save_state())
        reasons = compare_records(mine, theirs)
        if reasons:
            raise DeviceMismatch(self.device.name, reasons)


# -- probe (design.md §1.4) -------------------------------------------------------------------
def probe(device: Device) -> MigrationDriver:
    """The driver for ``device``: v2 first, then v1, else NotMigratable with the reason."""
    # imported here: the drivers import this module for the shared types
    from vfiod.migration.device.v1 import V1Driver
    from vfiod.migration.device.v2 import V2Driver

    v2_reason: str
    try:
        flags = device.mig_flags()
    except KernelError as e:
        # pre-6.18 drivers without a device_feature op answer EINVAL for any feature
        if e.errno != errno.EINVAL:
            raise
        flags, v2_reason = None, "VFIO_DEVICE_FEATURE MIGRATION: EINVAL"
    else:
        v2_reason = "VFIO_DEVICE_FEATURE MIGRATION: ENOTTY"
    if flags is not None:
        if flags & VFIO_MIGRATION_STOP_COPY:
            return V2Driver(device, flags)
        v2_reason = (f"VFIO_DEVICE_FEATURE MIGRATION: flags {flags:#x} lack the mandatory "
                     "STOP_COPY")
    region = device.find_region(VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
                                VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED)
    if region is None:
        raise NotMigratable(device.name, f"{v2_reason} and no v1 migration region")
    try:
        return V1Driver(device, region)
    except ValueError as e:
        raise NotMigratable(device.name, f"{v2_reason} and an unusable v1 migration "
                            f"region: {e}") from None
