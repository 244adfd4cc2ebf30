"""What both migration drivers do the same way (docs/architecture.md §1 steps 5–6, §1.5–§1.6;
docs/kernel-contract.md §5.4, §6.3, §6.6, §11): the hook order, every hook's sequence, the identity
record and the whole recovery sequence. A protocol (v1.py, v2.py) supplies only what
differs, as small methods ``DriverBase`` calls (template methods): how a state is read and
requested, how data is read and written, and the words its rungs use.

The recovery ladder, ``set_state(target, recover)``:

1. request ``target`` (never one the protocol forbids: v2 STOP_COPY → PRE_COPY(_P2P)
   hangs kernels 6.2+, §6.6);
2. on failure read the actual state back (the request's answer says nothing about it, §6.3);
3. if it is neither the target nor ``recover``: request ``recover``;
4. if that fails, or the device is in ERROR, or no recovery state was named:
   ``VFIO_DEVICE_RESET`` (the device returns to RUNNING and every data session ends, §3.5);
5. raise ``DeviceTransitionError`` listing every rung, with the first errno.

Nothing is requested of a device already in ERROR (v2: EINVAL + a kernel WARN, §11.2):
it is reset.

A device a VMM handed over (docs/architecture.md §8.1) is reset only if its attach said
``allow_reset: true`` (``allow_reset``): otherwise every reset rung above is replaced by
one saying the device needs its VMM, and the ladder stops at the last step before the
reset, with the state read back; the error's ``reset`` is then False. ``rollback`` reads the state back; a source already RUNNING stays; ERROR,
RESUMING and every destination past ``load_setup`` are reset (what a destination loaded is
discarded, never run); anything else is asked for RUNNING with reset as the only recovery.
"""

from __future__ import annotations

import abc
import errno
from typing import TYPE_CHECKING, ClassVar, NoReturn

from vfiod.errors import KernelError, MigrationError
from vfiod.migration.device.errors import (
    DeviceMismatch,
    DeviceTransitionError,
    ForbiddenTransition,
    HookOrderError,
)
from vfiod.migration.device.protocol import DeviceDataSink, HookPhase, Pending
from vfiod.migration.device.record import compare_records, decode_record, encode_record
from vfiod.migration.states import MigState

if TYPE_CHECKING:
    from vfiod.vfio.device import Device

__all__ = ["DriverBase", "DEVICE_PRECOPY_STATES"]

#: States in which pre-copy data can be read while the device runs.
DEVICE_PRECOPY_STATES = frozenset({MigState.PRE_COPY, MigState.PRE_COPY_P2P})
#: Phases of a destination: its device holds (part of) another device's state.
_LOADING_PHASES = frozenset({HookPhase.LOADING, HookPhase.LOADED, HookPhase.RESUMED})


class DriverBase(abc.ABC):
    """One device's migration: the hooks of ``MigrationDriver`` over the protocol methods
    below. ``protocol`` names it (display only); ``_VERB`` is how its state changes read
    in the ladder's rungs; ``_LOAD_FROM`` the states ``load_setup`` accepts."""

    protocol: ClassVar[str]
    #: False: never VFIO_DEVICE_RESET (a VMM's device it did not allow to reset)
    allow_reset: bool = True
    _VERB: ClassVar[str] = "SET"
    _LOAD_FROM: ClassVar[frozenset[MigState]] = frozenset(MigState)

    def __init__(self, device: Device, migration_flags: int) -> None:
        self.device = device
        self._migration_flags = migration_flags
        self._phase = HookPhase.IDLE
        self._rollback_log: tuple[str, ...] = ()
        # last: a protocol sets what _read_state needs before it calls this
        self._state = self._read_state()

    # -- what a protocol supplies -----------------------------------------------------------
    @property
    @abc.abstractmethod
    def has_precopy(self) -> bool: ...

    @property
    @abc.abstractmethod
    def has_p2p(self) -> bool: ...

    @property
    @abc.abstractmethod
    def capability_names(self) -> tuple[str, ...]: ...

    @abc.abstractmethod
    def _read_state(self) -> MigState:
        """The device state as the kernel reports it now (KernelError if it cannot)."""

    @abc.abstractmethod
    def _request(self, state: MigState) -> int:
        """Ask the kernel for ``state``; returns the data fd it handed back (-1: none)."""

    @abc.abstractmethod
    def _op(self, target: MigState) -> str:
        """The operation that requests ``target``, as errors name it."""

    @abc.abstractmethod
    def _end_data_session(self) -> None:
        """Release what reads or writes the device data (idempotent)."""

    @abc.abstractmethod
    def _pending(self) -> Pending:
        """``save_live_pending`` before the stream was read to its end."""

    @abc.abstractmethod
    def _read_precopy(self, sink: DeviceDataSink, max_bytes: int) -> int:
        """Up to about ``max_bytes`` of the pre-copy data available now (device in a
        pre-copy state); returns the bytes handed to ``sink``."""

    @abc.abstractmethod
    def _read_stopcopy(self, sink: DeviceDataSink) -> int:
        """The device (in STOP_COPY) read to the end of its state; returns the bytes."""

    @abc.abstractmethod
    def _write_chunk(self, data: memoryview) -> None:
        """One chunk of the source's device data into the resuming device."""

    @abc.abstractmethod
    def _validate_loaded(self) -> None:
        """End the resuming session once every chunk is in (raises if refused)."""

    def _arrive(self, state: MigState, fd: int | None) -> None:
        """Bookkeeping once the device is in ``state``: ``fd`` is what ``_request``
        returned, None when the state was read back rather than requested."""
        self._state = state

    def _state_label(self, state: MigState) -> str:
        """``state`` as the read-back rungs show it."""
        return state.name

    def _forbidden(self, current: MigState, target: MigState) -> str | None:
        """Why ``target`` must never be requested from ``current`` (None: it may be)."""
        return None

    def _record_fields(self) -> dict[str, int | str | bool]:
        """Extra identity fields a protocol adds (compared on the destination)."""
        return {}

    # -- what every driver answers ----------------------------------------------------------
    @property
    def device_name(self) -> str:
        return self.device.name

    @property
    def migration_flags(self) -> int:
        return self._migration_flags

    @property
    def phase(self) -> HookPhase:
        return self._phase

    @property
    def rollback_log(self) -> tuple[str, ...]:
        return self._rollback_log

    def state(self) -> MigState:
        return self._state

    def _expect(self, hook: str, *allowed: HookPhase) -> None:
        if self._phase not in allowed:
            raise HookOrderError(self.device.name, hook, self._phase, allowed)

    def save_state(self) -> bytes:
        return encode_record(self.device.name, self.protocol, self._migration_flags,
                             **self._record_fields())

    def check_state(self, record: bytes | memoryview) -> None:
        theirs = decode_record(record)
        mine = decode_record(self.save_state())
        reasons = compare_records(mine, theirs)
        if reasons:
            raise DeviceMismatch(self.device.name, reasons)

    # -- the recovery sequence ----------------------------------------------------------------
    def set_state(self, target: MigState, recover: MigState | None) -> None:
        """Request ``target``; on failure run the recovery ladder and raise
        DeviceTransitionError. ``recover`` None: reset is the only recovery."""
        why = self._forbidden(self._state, target)
        if why is not None:
            raise ForbiddenTransition(f"refusing device state {self._state.name} -> "
                                      f"{target.name} on {self.device.name}: {why}")
        if self._state is MigState.ERROR:
            rungs = [f"device is in ERROR: {target.name} not requested"]
            final = self._reset(rungs)
            raise DeviceTransitionError(errno.EIO, self._op(target), self.device.name, rungs,
                                        final, self.allow_reset)
        try:
            fd = self._request(target)
        except KernelError as e:
            self._ladder(e, target, recover)
        self._arrive(target, fd)

    def _ladder(self, err: KernelError, target: MigState,
                recover: MigState | None) -> NoReturn:
        """After a failed change to ``target``: read back; if the device is neither there
        nor in ERROR, change to ``recover``; reset when that fails, when there is no
        recovery state, or in ERROR. Raises with every rung taken."""
        verb = self._VERB
        rungs = [f"{verb} {target.name}: {err.errno_name}"]
        actual = final = self._read_back(rungs)
        need_reset = actual is None or actual is MigState.ERROR
        if actual is target:
            rungs.append(f"device reached {target.name} despite the error")
        elif actual is not None and not need_reset:
            refused = None if recover is None else self._forbidden(actual, recover)
            if recover is None:
                need_reset = True
            elif actual is recover:
                rungs.append(f"already in recovery state {recover.name}")
            elif refused is not None:
                rungs.append(f"{recover.name} not requested from {actual.name} ({refused})")
                need_reset = True
            else:
                try:
                    self._arrive(recover, self._request(recover))
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
                                    need_reset and self.allow_reset) from None

    def _read_back(self, rungs: list[str]) -> MigState | None:
        """Read the state for the ladder; None (and a rung saying why) if unreadable."""
        try:
            st = self._read_state()
        except KernelError as e:
            rungs.append(f"read back: {e.errno_name}" + (f" ({e.detail})" if e.detail else ""))
            return None
        rungs.append(f"read back: {self._state_label(st)}")
        self._arrive(st, None)
        return st

    def _reset(self, rungs: list[str]) -> MigState | None:
        """VFIO_DEVICE_RESET and read back; returns the state (None if unreadable). Not
        allowed (``allow_reset`` False): no reset, the state read back is returned."""
        if not self.allow_reset:
            rungs.append("VFIO_DEVICE_RESET: not done: its VMM did not allow resets "
                         "(attach allow_reset false); the device needs its VMM")
            self._end_data_session()
            return self._read_back(rungs)
        try:
            self.device.reset()
            rungs.append("VFIO_DEVICE_RESET: ok")
        except KernelError as e:
            rungs.append(f"VFIO_DEVICE_RESET: {e.errno_name}")
        self._end_data_session()       # a reset ends every data session
        try:
            self._state = self._read_state()
        except KernelError as e:
            self._state = MigState.ERROR       # unknown: treat as needing another reset
            rungs.append(f"state after reset unknown ({e.errno_name})")
            return None
        rungs.append(f"now {self._state.name}")
        return self._state

    def rollback(self) -> MigState:
        rungs: list[str] = []
        actual = final = self._read_back(rungs)
        err, reset = errno.EIO, self.allow_reset
        if (actual is None or actual in (MigState.ERROR, MigState.RESUMING)
                or self._phase in _LOADING_PHASES):
            # ERROR: only reset recovers. RESUMING: leaving it would validate a partial
            # stream, and a resuming session can only be abandoned by reset (§6.5). A
            # destination discards whatever it loaded: reset, never run it.
            final = self._reset(rungs)
        elif actual is not MigState.RUNNING:
            try:
                # v2: STOP_COPY goes via STOP; v1: _RUNNING set, _SAVING cleared
                self.set_state(MigState.RUNNING, None)
                rungs.append(f"{self._VERB} RUNNING: ok")
                final = MigState.RUNNING
            except DeviceTransitionError as e:
                rungs.extend(e.rungs)
                final, err, reset = e.final, e.errno, e.reset
        self._end_data_session()
        self._rollback_log = tuple(rungs)
        if final is not MigState.RUNNING:
            # the phase stays: a retried rollback of a destination still resets
            raise DeviceTransitionError(err, "rollback", self.device.name, rungs, final,
                                        reset)
        self._phase = HookPhase.IDLE
        return final

    def cleanup(self) -> None:
        failure: DeviceTransitionError | None = None
        if self._phase is HookPhase.SAVED and self._state is MigState.STOP_COPY:
            # the source is done: end the saving session (after the switchover, so it
            # adds nothing to downtime)
            try:
                self.set_state(MigState.STOP, None)
            except DeviceTransitionError as e:
                failure = e
        self._end_data_session()
        self._phase = HookPhase.IDLE
        if failure is not None:
            raise failure

    # -- source hooks -------------------------------------------------------------------------
    def save_setup(self) -> None:
        self._expect("save_setup", HookPhase.IDLE)
        self._state = self._read_state()
        if self._state not in (MigState.RUNNING, MigState.STOP):
            raise MigrationError(f"save_setup on {self.device.name}: device is in "
                                 f"{self._state.name}, expected RUNNING or STOP")
        # pre-copy only from RUNNING: from STOP the kernel's path would start the device
        if self.has_precopy and self._state is MigState.RUNNING:
            self.set_state(MigState.PRE_COPY, MigState.RUNNING)
        self._phase = HookPhase.SAVING

    def save_live_pending(self) -> Pending:
        self._expect("save_live_pending", HookPhase.IDLE, HookPhase.SAVING,
                     HookPhase.QUIESCED, HookPhase.SAVED)
        if self._phase is HookPhase.SAVED:
            return Pending(0, 0, True)
        return self._pending()

    def save_live_iterate(self, sink: DeviceDataSink, max_bytes: int) -> int:
        self._expect("save_live_iterate", HookPhase.SAVING, HookPhase.QUIESCED)
        if max_bytes <= 0:
            raise ValueError(f"save_live_iterate on {self.device.name}: max_bytes must be "
                             f"positive, not {max_bytes}")
        if self._state not in DEVICE_PRECOPY_STATES:
            return 0               # no pre-copy session: everything comes at stop-copy
        return self._read_precopy(sink, max_bytes)

    def quiesce_p2p(self) -> None:
        self._expect("quiesce_p2p", HookPhase.SAVING)
        if not self.has_p2p:
            raise MigrationError(f"quiesce_p2p on {self.device.name}: the device has no P2P "
                                 f"states ({self.protocol}: "
                                 f"{', '.join(self.capability_names)})")
        if self._state is MigState.PRE_COPY:
            self.set_state(MigState.PRE_COPY_P2P, MigState.RUNNING)
        elif self._state is MigState.RUNNING:
            self.set_state(MigState.RUNNING_P2P, MigState.RUNNING)
        # STOP: already quiet, nothing to do
        self._phase = HookPhase.QUIESCED

    def save_live_complete_precopy(self, sink: DeviceDataSink) -> int:
        self._expect("save_live_complete_precopy", HookPhase.SAVING, HookPhase.QUIESCED)
        if self._state is not MigState.STOP_COPY:
            # v2 from PRE_COPY(_P2P): the kernel keeps the session and returns -1: read on
            self.set_state(MigState.STOP_COPY, MigState.RUNNING)
        total = self._read_stopcopy(sink)
        self._phase = HookPhase.SAVED
        return total

    # -- destination hooks --------------------------------------------------------------------
    def load_setup(self) -> None:
        self._expect("load_setup", HookPhase.IDLE)
        self._state = self._read_state()
        if self._state not in self._LOAD_FROM:
            allowed = " or ".join(sorted(s.name for s in self._LOAD_FROM))
            raise MigrationError(f"load_setup on {self.device.name}: device is in "
                                 f"{self._state.name}, expected {allowed}")
        # v2 from RUNNING: the kernel walks RUNNING -> (RUNNING_P2P) -> STOP -> RESUMING
        self.set_state(MigState.RESUMING, MigState.RUNNING)
        self._phase = HookPhase.LOADING

    def load_state(self, chunk: bytes | memoryview) -> None:
        self._expect("load_state", HookPhase.LOADING)
        self._write_chunk(memoryview(chunk).cast("B"))

    def load_complete(self) -> None:
        self._expect("load_complete", HookPhase.LOADING)
        self._validate_loaded()
        self._phase = HookPhase.LOADED

    def resume(self) -> None:
        self._expect("resume", HookPhase.LOADED)
        # if RUNNING fails, back to where the device waits; a resuming session still open
        # (v1 has no validation step) can only be left by reset
        recover = None if self._state is MigState.RESUMING else self._state
        self.set_state(MigState.RUNNING, recover)
        self._phase = HookPhase.RESUMED
