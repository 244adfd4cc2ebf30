"""Migration driver for protocol v2: the ``VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`` state
machine and its data fd (docs/kernel-contract.md §6, pitfalls §11; docs/architecture.md §1.5–§1.6).

The kernel composes multi-step transitions; this driver only names a target and a recovery
state (docs/architecture.md §2), and the recovery ladder around each SET is the shared one of
``base`` (SET target → GET → SET recovery → VFIO_DEVICE_RESET, every rung reported).

Rules kept here (§11): never request PRE_COPY/PRE_COPY_P2P while the device is in
STOP_COPY (kernels 6.2+ spin forever); the PRE_COPY fd is kept through PRE_COPY_P2P and
STOP_COPY when those SETs return -1 (mtty), a new fd replaces (and closes) the old one, a
state without a data session closes it; a 0 read is end of stream only in STOP_COPY — in
PRE_COPY it, like ENOMSG, means "nothing now". Every stop-copy read, and the first read of
a pre-copy pass, first polls the fd for at most ``read_deadline_s``: a device that never
produces data fails the read with ETIMEDOUT, a kernel error like any other, so the session
rolls back instead of hanging. Later reads of a pre-copy pass take only what is readable
now (a fd that is not ends the pass, like ENOMSG).
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from vfiod.abi.vfio import VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY
from vfiod.errors import KernelError
from vfiod.migration.device.base import DEVICE_PRECOPY_STATES, DriverBase
from vfiod.migration.device.protocol import DeviceDataSink, Pending
from vfiod.migration.states import MigState
from vfiod.vfio.features import migration_flag_names

if TYPE_CHECKING:
    from vfiod.vfio.device import Device

log = logging.getLogger(__name__)

#: States with an open data session (a data fd that reads or writes the stream).
_SESSION = frozenset({MigState.PRE_COPY, MigState.PRE_COPY_P2P, MigState.STOP_COPY,
                      MigState.RESUMING})
#: QEMU's answer when a driver cannot size its stop-copy data (VFIO_MIG_STOP_COPY_SIZE):
#: large enough that a downtime limit is never believed met by accident.
UNKNOWN_STOPCOPY_BYTES = 100 << 30
DEFAULT_CHUNK = 1 << 20
#: longest wait for one data-fd read to have something: generous for a device that
#: serialises state slowly, finite so a stuck device cannot hold the guest stopped
DEFAULT_READ_DEADLINE_S = 30.0


def _hand_over(sink: DeviceDataSink, chunk: memoryview) -> None:
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
                 unknown_stopcopy_bytes: int = UNKNOWN_STOPCOPY_BYTES,
                 read_deadline_s: float = DEFAULT_READ_DEADLINE_S) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        if not read_deadline_s > 0:
            raise ValueError(f"read_deadline_s must be positive, not {read_deadline_s}")
        #: how long each data-fd read may wait for data (a test may shorten it)
        self.read_deadline_s = read_deadline_s
        self._chunk = chunk_size
        self._buf: bytearray | None = None
        self._fd = -1
        self._data_size_ok: bool | None = None    # MIG_DATA_SIZE supported (6.2+)?
        self._unknown_stopcopy = unknown_stopcopy_bytes
        super().__init__(device, flags)

    # -- capabilities ---------------------------------------------------------------------
    @property
    def has_precopy(self) -> bool:
        return bool(self.migration_flags & VFIO_MIGRATION_PRE_COPY)

    @property
    def has_p2p(self) -> bool:
        return bool(self.migration_flags & VFIO_MIGRATION_P2P)

    @property
    def capability_names(self) -> tuple[str, ...]:
        return migration_flag_names(self.migration_flags)

    @property
    def data_fd(self) -> int:
        """The open data fd (-1 if none); owned by this driver."""
        return self._fd

    # -- the state machine --------------------------------------------------------------------
    def _read_state(self) -> MigState:
        st = self.device.get_mig_state()
        if not isinstance(st, MigState):
            raise KernelError(errno.EPROTO, "VFIO_DEVICE_FEATURE(GET MIG_DEVICE_STATE)",
                              self.device.name, f"unknown device state {st}")
        return st

    def _request(self, state: MigState) -> int:
        return self.device.set_mig_state(state)

    def _op(self, target: MigState) -> str:
        return f"VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE {target.name})"

    def _forbidden(self, current: MigState, target: MigState) -> str | None:
        if current is MigState.STOP_COPY and target in DEVICE_PRECOPY_STATES:
            return "hangs kernels 6.2+"        # a soft lockup, docs/kernel-contract.md §6.6
        return None

    def _arrive(self, state: MigState, fd: int | None) -> None:
        if fd is not None and fd >= 0:
            if self._fd >= 0 and self._fd != fd:
                log.info("%s: %s returned a new data fd; closing the old one",
                         self.device.name, state.name)
                self._end_data_session()
            self._fd = fd
        elif state not in _SESSION:
            self._end_data_session()   # the session ended: the old fd now fails with ENODEV
        elif self._fd < 0 and fd is not None:
            self._state = state
            raise KernelError(errno.EBADF, self._op(state), self.device.name,
                              "no data fd returned and none open")
        self._state = state

    def _end_data_session(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            self.device.data_close(fd)
        except KernelError as e:       # only EBADF is possible: a bookkeeping bug, say so
            log.error("%s: %s", self.device.name, e)

    # -- source data ------------------------------------------------------------------------
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

    def _pending(self) -> Pending:
        precopy = 0
        if self._state in DEVICE_PRECOPY_STATES:
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

    def _wait_for_data(self) -> None:
        """Poll the data fd until a read would not block, for at most the deadline."""
        if not self.device.data_wait_readable(self._fd, self.read_deadline_s):
            raise KernelError(errno.ETIMEDOUT, f"read(migration data fd) in {self._state.name}",
                              self.device.name, f"no data within {self.read_deadline_s:g} s")

    def _read_precopy(self, sink: DeviceDataSink, max_bytes: int) -> int:
        initial, dirty = self.device.precopy_info(self._fd)
        if initial + dirty == 0:
            return 0
        buf = self._chunk_view()
        total = 0
        while total < max_bytes:
            # the first read waits: the device said it has data. Later ones take only what
            # is there now, since mlx5's poll stays silent once pre-copy data runs out.
            if total == 0:
                self._wait_for_data()
            elif not self.device.data_wait_readable(self._fd, 0):
                break
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

    def _read_stopcopy(self, sink: DeviceDataSink) -> int:
        buf = self._chunk_view()
        total = 0
        while True:
            self._wait_for_data()
            n = self.device.data_readinto(self._fd, buf)
            if n == 0:                         # STOP_COPY: 0 is the permanent end
                break
            _hand_over(sink, buf[:n])
            total += n
        return total

    # -- destination data ---------------------------------------------------------------------
    def _write_chunk(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            n = self.device.data_write(self._fd, data[done:])
            if n <= 0:
                raise KernelError(errno.EIO, "write(migration data fd)", self.device.name,
                                  f"short write: {done} of {len(data)} bytes")
            done += n

    def _validate_loaded(self) -> None:
        # RESUMING -> STOP makes the driver validate; a RESUMING session can only be
        # abandoned by reset, so no recovery state
        self.set_state(MigState.STOP, None)
