"""Migration driver for protocol v2: the ``VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`` state
machine and its data fd (vfio-uapi.md §6, pitfalls §11; design.md §1.5–§1.6).

The kernel composes multi-step transitions; this driver only names a target and a recovery
state (design.md §2). ``set_state(target, recover)`` is the recovery ladder:

1. SET ``target``;
2. on failure GET the actual state (the SET's copy-back says nothing about it, §6.3);
3. if it is neither the target nor ``recover``: SET ``recover``;
4. if that fails, or the device is in ERROR, or no recovery state was named:
   ``VFIO_DEVICE_RESET`` (the device returns to RUNNING, its data fd dies, §3.5);
5. raise ``DeviceTransitionError`` listing every rung, with the first errno.

Rules kept here (§11): never request PRE_COPY/PRE_COPY_P2P while the device is in
STOP_COPY (kernels 6.2+ spin forever); never request anything in ERROR (EINVAL + WARN),
reset instead; the PRE_COPY fd is kept through PRE_COPY_P2P and STOP_COPY when those SETs
return -1 (mtty), a new fd replaces (and closes) the old one; a 0 read is end of stream only
in STOP_COPY — in PRE_COPY it, like ENOMSG, means "nothing now".
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from vfiod.abi.vfio import VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY
from vfiod.errors import KernelError, MigrationError
from vfiod.migration.device.base import (
    DeviceTransitionError,
    DriverBase,
    ForbiddenTransition,
    Pending,
    Phase,
    Sink,
)
from vfiod.migration.states import MigState

if TYPE_CHECKING:
    from vfiod.vfio.device import Device

log = logging.getLogger(__name__)

_PRECOPY = frozenset({MigState.PRE_COPY, MigState.PRE_COPY_P2P})
#: States with an open data session (a data fd that reads or writes the stream).
_SESSION = frozenset({MigState.PRE_COPY, MigState.PRE_COPY_P2P, MigState.STOP_COPY,
                      MigState.RESUMING})
#: QEMU's answer when a driver cannot size its stop-copy data (VFIO_MIG_STOP_COPY_SIZE):
#: large enough that a downtime limit is never believed met by accident.
UNKNOWN_STOPCOPY_BYTES = 100 << 30
DEFAULT_CHUNK = 1 << 20


def _hand_over(sink: Sink, chunk: memoryview) -> None:
    """Give ``chunk`` (a view of the reused read buffer) to ``sink``, then release it so
    a sink that kept it instead of consuming it fails loudly instead of seeing new data."""
    try:
        sink(chunk)
    finally:
        chunk.release()


class V2Driver(DriverBase):
    """A v2 device (``flags``: the MIGRATION feature's VFIO_MIGRATION_* bits)."""

    protocol = "v2"

    def __init__(self, device: Device, flags: int, *, chunk_size: int = DEFAULT_CHUNK,
                 unknown_stopcopy_bytes: int = UNKNOWN_STOPCOPY_BYTES) -> None:
        super().__init__(device, flags)
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        self._chunk = chunk_size
        self._buf: bytearray | None = None
        self._fd = -1
        self._data_size_ok: bool | None = None    # MIG_DATA_SIZE supported (6.2+)?
        self._unknown_stopcopy = unknown_stopcopy_bytes
        #: what the last rollback did, rung by rung (for status and logs)
        self.rollback_log: list[str] = []
        self._state = self._get()

    # -- capabilities ---------------------------------------------------------------------
    @property
    def has_precopy(self) -> bool:
        return bool(self.flags & VFIO_MIGRATION_PRE_COPY)

    @property
    def has_p2p(self) -> bool:
        return bool(self.flags & VFIO_MIGRATION_P2P)

    @property
    def data_fd(self) -> int:
        """The open data fd (-1 if none); owned by this driver."""
        return self._fd

    # -- the state machine --------------------------------------------------------------------
    def _get(self) -> MigState:
        st = self.device.get_mig_state()
        if not isinstance(st, MigState):
            raise KernelError(errno.EPROTO, "VFIO_DEVICE_FEATURE(GET MIG_DEVICE_STATE)",
                              self.device.name, f"unknown device state {st}")
        return st

    def _read_back(self, rungs: list[str]) -> MigState | None:
        try:
            st = self._get()
        except KernelError as e:
            rungs.append(f"read back: {e.errno_name}")
            return None
        rungs.append(f"read back: {st.name}")
        self._arrived(st, -1, strict=False)
        return st

    def set_state(self, target: MigState, recover: MigState | None) -> None:
        """SET ``target``; on failure run the recovery ladder and raise
        DeviceTransitionError. ``recover`` None: reset is the only recovery."""
        if self._state is MigState.STOP_COPY and target in _PRECOPY:
            # Must never reach the kernel (soft lockup on 6.2+, vfio-uapi.md §6.6).
            raise ForbiddenTransition(f"refusing MIG_DEVICE_STATE STOP_COPY -> {target.name} "
                                     f"on {self.device.name}: hangs kernels 6.2+")
        if self._state is MigState.ERROR:
            rungs = [f"device is in ERROR: {target.name} not requested"]
            final = self._reset(rungs)
            raise DeviceTransitionError(errno.EIO, self._op(target), self.device.name, rungs,
                                        final, True)
        try:
            fd = self.device.set_mig_state(target)
        except KernelError as e:
            self._ladder(e, target, recover)
        self._arrived(target, fd)

    @staticmethod
    def _op(target: MigState) -> str:
        return f"VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE {target.name})"

    def _arrived(self, state: MigState, fd: int, strict: bool = True) -> None:
        """Bookkeeping after the device reached ``state`` (``fd``: what the SET returned)."""
        if fd >= 0:
            if self._fd >= 0 and self._fd != fd:
                log.info("%s: %s returned a new data fd; closing the old one",
                         self.device.name, state.name)
                self._close_fd()
            self._fd = fd
        elif state not in _SESSION:
            self._close_fd()       # the session ended: the old fd now fails with ENODEV
        elif self._fd < 0 and strict:
            self._state = state
            raise KernelError(errno.EBADF, self._op(state), self.device.name,
                              "no data fd returned and none open")
        self._state = state

    _VERB = "SET"

    def _apply(self, state: MigState) -> None:
        self._arrived(state, self.device.set_mig_state(state))


    def _recovery_refused(self, actual: MigState, recover: MigState) -> str | None:
        if actual is MigState.STOP_COPY and recover in _PRECOPY:
            return f"{recover.name} not requested from STOP_COPY (kernel hang)"
        return None

    def _reset(self, rungs: list[str]) -> MigState | None:
        """VFIO_DEVICE_RESET and read back; returns the state (None if unreadable)."""
        try:
            self.device.reset()
            rungs.append("VFIO_DEVICE_RESET: ok")
        except KernelError as e:
            rungs.append(f"VFIO_DEVICE_RESET: {e.errno_name}")
        self._close_fd()           # a reset ends every data session
        try:
            self._state = self._get()
        except KernelError as e:
            self._state = MigState.ERROR       # unknown: treat as needing another reset
            rungs.append(f"state after reset unknown ({e.errno_name})")
            return None
        rungs.append(f"now {self._state.name}")
        return self._state

    def _close_fd(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            self.device.data_close(fd)
        except KernelError as e:       # only EBADF is possible: a bookkeeping bug, say so
            log.error("%s: %s", self.device.name, e)

    # -- source hooks -----------------------------------------------------------------------
    def save_setup(self) -> None:
        self._expect("save_setup", Phase.IDLE)
        self._state = self._get()
        if self._state not in (MigState.RUNNING, MigState.STOP):
            raise MigrationError(f"save_setup on {self.device.name}: device is in "
                                 f"{self._state.name}, expected RUNNING or STOP")
        # pre-copy only from RUNNING: from STOP the kernel's path would start the device
        if self.has_precopy and self._state is MigState.RUNNING:
            self.set_state(MigState.PRE_COPY, MigState.RUNNING)
        self._phase = Phase.SAVING

    def _stopcopy_bytes(self) -> tuple[int, bool]:
        if self._data_size_ok is not False:
            try:
                size = self.device.mig_data_size()
            except KernelError as e:
                if e.errno not in (errno.ENOTTY, errno.EINVAL):
                    raise
                self._data_size_ok = False      # 5.18–6.1 kernel or driver: no estimate
            else:
                self._data_size_ok = True
                return size, True
        return self._unknown_stopcopy, False

    def save_live_pending(self) -> Pending:
        self._expect("save_live_pending", Phase.IDLE, Phase.SAVING, Phase.QUIESCED, Phase.SAVED)
        if self._phase is Phase.SAVED:
            return Pending(0, 0, True)
        precopy = 0
        if self._state in _PRECOPY:
            initial, dirty = self.device.precopy_info(self._fd)
            precopy = initial + dirty
        # MIG_DATA_SIZE may count what pre-copy still has: over-estimating downtime is the
        # safe side, so it is not reduced by ``precopy``.
        stop, exact = self._stopcopy_bytes()
        return Pending(precopy, stop, exact)

    def _chunk_view(self) -> memoryview:
        if self._buf is None:
            self._buf = bytearray(self._chunk)
        return memoryview(self._buf)

    def save_live_iterate(self, sink: Sink, max_bytes: int) -> int:
        self._expect("save_live_iterate", Phase.SAVING, Phase.QUIESCED)
        if max_bytes <= 0:
            raise ValueError(f"save_live_iterate on {self.device.name}: max_bytes must be "
                             f"positive, not {max_bytes}")
        if self._state not in _PRECOPY:
            return 0               # no pre-copy session: everything comes at stop-copy
        initial, dirty = self.device.precopy_info(self._fd)
        if initial + dirty == 0:
            return 0
        buf = self._chunk_view()
        total = 0
        while total < max_bytes:
            view = buf[:min(len(buf), max_bytes - total)]
            try:
                n = self.device.data_readinto(self._fd, view)
            except KernelError as e:
                if e.errno == errno.ENOMSG:    # temporary end of pre-copy data (mlx5)
                    break
                raise
            if n == 0:                         # temporary end too (mtty, qat): not EOF
                break
            _hand_over(sink, view[:n])
            total += n
        return total

    def quiesce_p2p(self) -> None:
        self._expect("quiesce_p2p", Phase.SAVING)
        if not self.has_p2p:
            raise MigrationError(f"quiesce_p2p on {self.device.name}: the device does not "
                                 "offer VFIO_MIGRATION_P2P")
        if self._state is MigState.PRE_COPY:
            self.set_state(MigState.PRE_COPY_P2P, MigState.RUNNING)
        elif self._state is MigState.RUNNING:
            self.set_state(MigState.RUNNING_P2P, MigState.RUNNING)
        # STOP: already quiet, nothing to do
        self._phase = Phase.QUIESCED

    def save_live_complete_precopy(self, sink: Sink) -> int:
        self._expect("save_live_complete_precopy", Phase.SAVING, Phase.QUIESCED)
        if self._state is not MigState.STOP_COPY:
            # from PRE_COPY(_P2P) the kernel keeps the session and returns -1: read on
            self.set_state(MigState.STOP_COPY, MigState.RUNNING)
        buf = self._chunk_view()
        total = 0
        while True:
            n = self.device.data_readinto(self._fd, buf)
            if n == 0:                         # STOP_COPY: 0 is the permanent end
                break
            _hand_over(sink, buf[:n])
            total += n
        self._phase = Phase.SAVED
        return total

    # -- destination hooks ----------------------------------------------------------------
    def load_setup(self) -> None:
        self._expect("load_setup", Phase.IDLE)
        self._state = self._get()
        # from RUNNING the kernel walks RUNNING -> (RUNNING_P2P) -> STOP -> RESUMING
        self.set_state(MigState.RESUMING, MigState.RUNNING)
        self._phase = Phase.LOADING

    def load_state(self, chunk: bytes | memoryview) -> None:
        self._expect("load_state", Phase.LOADING)
        view = memoryview(chunk).cast("B")
        done = 0
        while done < len(view):
            n = self.device.data_write(self._fd, view[done:])
            if n <= 0:
                raise KernelError(errno.EIO, "write(migration data fd)", self.device.name,
                                  f"short write: {done} of {len(view)} bytes")
            done += n

    def load_complete(self) -> None:
        self._expect("load_complete", Phase.LOADING)
        # RESUMING -> STOP makes the driver validate; a RESUMING session can only be
        # abandoned by reset, so no recovery state
        self.set_state(MigState.STOP, None)
        self._phase = Phase.LOADED

    def resume(self) -> None:
        self._expect("resume", Phase.LOADED)
        self.set_state(MigState.RUNNING, MigState.STOP)
        self._phase = Phase.RESUMED

    # -- both ---------------------------------------------------------------------------------
    def cleanup(self) -> None:
        failure: DeviceTransitionError | None = None
        if self._phase is Phase.SAVED and self._state is MigState.STOP_COPY:
            # the source is done: end the saving session (after the switchover, so it
            # adds nothing to downtime)
            try:
                self.set_state(MigState.STOP, None)
            except DeviceTransitionError as e:
                failure = e
        self._close_fd()
        self._phase = Phase.IDLE
        if failure is not None:
            raise failure

    def rollback(self) -> MigState:
        rungs: list[str] = []
        actual = self._read_back(rungs)
        loading = self._phase in (Phase.LOADING, Phase.LOADED, Phase.RESUMED)
        if actual is MigState.RUNNING and not loading:
            pass
        elif actual is None or actual in (MigState.ERROR, MigState.RESUMING) or loading:
            # ERROR: only reset recovers. RESUMING: leaving it would validate a partial
            # stream, and a resuming session can only be abandoned by reset (§6.5). A
            # destination discards whatever it loaded: reset, never run it.
            self._reset(rungs)
        else:
            try:
                self.set_state(MigState.RUNNING, None)   # STOP_COPY goes via STOP
                rungs.append("SET RUNNING: ok")
            except DeviceTransitionError as e:
                rungs.extend(e.rungs)
                if e.final is not MigState.RUNNING:
                    self.rollback_log = rungs
                    raise
        self._close_fd()
        self.rollback_log = rungs
        self._phase = Phase.IDLE
        if self._state is not MigState.RUNNING:
            raise DeviceTransitionError(errno.EIO, "rollback", self.device.name, rungs,
                                        None if actual is None else self._state, True)
        return self._state
