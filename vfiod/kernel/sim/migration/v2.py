"""Migration protocol v2 of a simulated device (docs/kernel-contract.md §6.2 - §6.9): the
``FeatureHandler`` for VFIO_DEVICE_FEATURE_MIGRATION (1), MIG_DEVICE_STATE (2) and
MIG_DATA_SIZE (9), and the kernel's state machine.

The 8x8 next-hop table and the skip-unsupported loop of ``vfio_mig_get_next_state``
(§6.6) live here and nowhere else in vfiod: the daemon asks for a target state and lets
the (real or simulated) kernel find the path.

Rules this simulator enforces, and the choices it makes where drivers differ:

* A SET to the current state succeeds with no arc and ``data_fd`` -1. Any SET while in
  ERROR fails with EINVAL (``spec.extra["error_set_errno"]`` models pds' EIO); only
  VFIO_DEVICE_RESET (``reset``) or closing the device leaves ERROR.
* A requested value >= 8, ERROR, or a state the device's flags do not offer: EINVAL.
* STOP_COPY -> PRE_COPY / PRE_COPY_P2P raises ``SimulatorViolation``: the table says
  ERROR there and the skip loop of kernels 6.2+ never leaves it (a soft lockup).
* Each arc first passes the fault point ``transition:<FROM>-><TO>`` (device name as
  target). An injected EIO puts the device in ERROR (the driver lost the device); any
  other injected errno leaves it in the last state it reached.
* RESUMING -> STOP validates the stream; a bad or short stream fails with EINVAL and the
  device stays in RESUMING with its session (mtty and mlx5 do not change state on a
  failed arc); only a reset aborts it.
* On any failed SET the payload is still copied back: ``device_state`` = the requested
  value, ``data_fd`` = -1 (§6.3).
"""

from __future__ import annotations

import errno
import struct
from collections import deque

import vfiod.abi.vfio as v
from vfiod.errors import KernelError, SimulatorViolation
from vfiod.kernel.sim.base import SimFile, fail
from vfiod.kernel.sim.interfaces import DeviceSpec, FdTable
from vfiod.kernel.sim.migration.data_fd import ResumingFile, SavingFile
from vfiod.kernel.sim.migration.device_model import DeviceModel, extra_int
from vfiod.kernel.sim.migration.stream import LoadSession, SaveSession, full_stream_length

S = v.MigState
STOP_COPY, P2P, PRE_COPY = (v.VFIO_MIGRATION_STOP_COPY, v.VFIO_MIGRATION_P2P,
                            v.VFIO_MIGRATION_PRE_COPY)
KNOWN_FLAGS = STOP_COPY | P2P | PRE_COPY

#: Capability flags each state needs (§6.6); ERROR needs an impossible mask.
STATE_FLAGS: dict[S, int] = {
    S.ERROR: ~0 & 0xFFFFFFFF,
    S.STOP: STOP_COPY,
    S.RUNNING: STOP_COPY,
    S.STOP_COPY: STOP_COPY,
    S.RESUMING: STOP_COPY,
    S.RUNNING_P2P: STOP_COPY | P2P,
    S.PRE_COPY: STOP_COPY | PRE_COPY,
    S.PRE_COPY_P2P: STOP_COPY | P2P | PRE_COPY,
}


def _row(stop: S, running: S, stop_copy: S, resuming: S, running_p2p: S, pre_copy: S,
         pre_copy_p2p: S) -> dict[S, S]:
    return {S.STOP: stop, S.RUNNING: running, S.STOP_COPY: stop_copy, S.RESUMING: resuming,
            S.RUNNING_P2P: running_p2p, S.PRE_COPY: pre_copy, S.PRE_COPY_P2P: pre_copy_p2p,
            S.ERROR: S.ERROR}


# NEXT_HOP[cur][target]: the first hop of the shortest path with every optional state
# present (§6.6). A cell equal to ``cur`` is never used (target == cur is handled first).
NEXT_HOP: dict[S, dict[S, S]] = {
    S.STOP: _row(S.STOP, S.RUNNING_P2P, S.STOP_COPY, S.RESUMING, S.RUNNING_P2P,
                 S.RUNNING_P2P, S.RUNNING_P2P),
    S.RUNNING: _row(S.RUNNING_P2P, S.RUNNING, S.RUNNING_P2P, S.RUNNING_P2P, S.RUNNING_P2P,
                    S.PRE_COPY, S.RUNNING_P2P),
    S.STOP_COPY: _row(S.STOP, S.STOP, S.STOP_COPY, S.STOP, S.STOP, S.ERROR, S.ERROR),
    S.RESUMING: _row(S.STOP, S.STOP, S.STOP, S.RESUMING, S.STOP, S.STOP, S.STOP),
    S.RUNNING_P2P: _row(S.STOP, S.RUNNING, S.STOP, S.STOP, S.RUNNING_P2P, S.RUNNING,
                        S.PRE_COPY_P2P),
    S.PRE_COPY: _row(S.RUNNING, S.RUNNING, S.PRE_COPY_P2P, S.RUNNING, S.RUNNING,
                     S.PRE_COPY, S.PRE_COPY_P2P),
    S.PRE_COPY_P2P: _row(S.RUNNING_P2P, S.RUNNING_P2P, S.STOP_COPY, S.RUNNING_P2P,
                         S.RUNNING_P2P, S.PRE_COPY, S.PRE_COPY_P2P),
    S.ERROR: {s: S.ERROR for s in S},
}

RUNNING_STATES = frozenset({S.RUNNING, S.RUNNING_P2P, S.PRE_COPY, S.PRE_COPY_P2P})
SAVING_STATES = frozenset({S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY})
_U64 = struct.Struct("<Q")
_MIG_STATE = struct.Struct("<Ii")


def supported(flags: int, state: S) -> bool:
    need = STATE_FLAGS[state]
    return flags & need == need


def next_hop(flags: int, cur: S, target: S, device: str = "") -> S:
    """``vfio_mig_get_next_state``: the next state on the way from ``cur`` to ``target``
    for a device with migration ``flags`` (both states already known to be supported)."""
    nxt = NEXT_HOP[cur][target]
    # Skip states the device does not implement; the kernel loops here without checking
    # for the ERROR sentinel, which is the STOP_COPY -> PRE_COPY* hang of 6.2+.
    while not supported(flags, nxt):
        if nxt == S.ERROR:
            raise SimulatorViolation(
                f"MIG_DEVICE_STATE {cur.name} -> {target.name} on {device}: the kernel's "
                "next-state loop never ends here (soft lockup on Linux 6.2+); never "
                "request a PRE_COPY state from STOP_COPY")
        nxt = NEXT_HOP[nxt][target]
    if nxt == S.ERROR:
        raise fail(errno.EINVAL, "vfio_mig_get_next_state", device,
                   f"no path {cur.name} -> {target.name}")
    return nxt


class MigrationV2:
    """FeatureHandler + Resettable for one v2 device; see the module docstring."""

    feature_ids: tuple[int, ...] = (v.VFIO_DEVICE_FEATURE_MIGRATION,
                                    v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                                    v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE)

    def __init__(self, spec: DeviceSpec, fds: FdTable, model: DeviceModel) -> None:
        flags = spec.mig_flags
        if not flags & STOP_COPY or flags & ~KNOWN_FLAGS:
            raise ValueError(f"{spec.name}: v2 mig_flags {flags:#x} must include "
                             f"VFIO_MIGRATION_STOP_COPY and only STOP_COPY|P2P|PRE_COPY")
        empty = spec.extra.get("precopy_empty", "enomsg")
        if empty not in ("enomsg", "zero"):
            raise ValueError(f"{spec.name}: extra['precopy_empty'] must be 'enomsg' or "
                             f"'zero', not {empty!r}")
        self.name = spec.name
        self.flags = flags
        self.fds = fds
        self.faults = fds.faults
        self.model = model
        self.precopy_size = spec.precopy_size
        self.precopy_empty_enomsg = empty == "enomsg"
        self.error_set_errno = extra_int(spec, "error_set_errno", errno.EINVAL) or errno.EINVAL
        self.state = S.RUNNING
        self.saving: SaveSession | None = None
        self.resuming: LoadSession | None = None
        #: the latest arcs taken, oldest first (tests compare them with documented paths)
        self.arcs: deque[tuple[S, S]] = deque(maxlen=64)

    # -- FeatureHandler --------------------------------------------------------------------
    def directions(self, feature: int) -> int:
        if feature == v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE:
            return v.VFIO_DEVICE_FEATURE_GET | v.VFIO_DEVICE_FEATURE_SET
        return v.VFIO_DEVICE_FEATURE_GET

    def handle(self, feature: int, flags: int, payload: memoryview) -> None:
        if feature == v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE:
            self._mig_state(flags, payload)
            return
        op = f"VFIO_DEVICE_FEATURE(GET {feature})"
        if len(payload) < _U64.size:
            raise fail(errno.EINVAL, op, self.name, f"payload {len(payload)} < 8 bytes")
        if feature == v.VFIO_DEVICE_FEATURE_MIGRATION:
            _U64.pack_into(payload, 0, self.flags)
        else:
            _U64.pack_into(payload, 0, self.stop_copy_length())

    def _mig_state(self, flags: int, payload: memoryview) -> None:
        if len(payload) < _MIG_STATE.size:
            raise fail(errno.EINVAL, "VFIO_DEVICE_FEATURE(MIG_DEVICE_STATE)", self.name,
                       f"payload {len(payload)} < {_MIG_STATE.size} bytes")
        if flags & v.VFIO_DEVICE_FEATURE_GET:
            _MIG_STATE.pack_into(payload, 0, int(self.state), -1)
            return
        requested = _MIG_STATE.unpack_from(payload)[0]
        try:
            fd = self.set_state(requested)
        except KernelError:
            # The kernel copies the struct back even on failure (§6.3).
            _MIG_STATE.pack_into(payload, 0, requested, -1)
            raise
        _MIG_STATE.pack_into(payload, 0, requested, fd)

    def stop_copy_length(self) -> int:
        """MIG_DATA_SIZE: what STOP_COPY would stream from here (any state, §6.9)."""
        if self.saving is not None and not self.saving.ended:
            return self.saving.stop_copy_length()
        return full_stream_length(self.model)

    # -- the state machine -----------------------------------------------------------------
    def set_state(self, requested: int) -> int:
        """Run a whole SET; returns the new data fd or -1."""
        op = f"SET MIG_DEVICE_STATE {requested}"
        if self.state == S.ERROR:
            raise fail(self.error_set_errno, op, self.name,
                       "device is in ERROR; only VFIO_DEVICE_RESET recovers")
        if requested >= v.VFIO_DEVICE_STATE_NR or not supported(self.flags, S(requested)):
            raise fail(errno.EINVAL, op, self.name,
                       f"state {requested} is not supported (flags {self.flags:#x})")
        target = S(requested)
        fd = -1
        while self.state != target:
            nxt = next_hop(self.flags, self.state, target, self.name)
            file = self._arc(self.state, nxt, op)
            if file is not None:
                # Only the final hop may open a session (§6.6); the table guarantees it.
                assert nxt == target, f"data fd opened on interior hop {nxt.name}"
                fd = self.fds.install(file)
        return fd

    def _arc(self, cur: S, nxt: S, op: str) -> SimFile | None:
        try:
            self.faults.check(f"transition:{cur.name}->{nxt.name}", op, self.name)
        except KernelError as e:
            if e.errno == errno.EIO:
                self._enter_error()
            raise
        file: SimFile | None = None
        self.model.running = nxt in RUNNING_STATES
        if cur == S.RESUMING and nxt == S.STOP:
            assert self.resuming is not None
            try:
                self.resuming.finish()
            except KernelError:
                self.model.running = False     # still RESUMING: stopped
                raise
            self._end_sessions()
        elif nxt in SAVING_STATES and cur not in SAVING_STATES:
            precopy = nxt != S.STOP_COPY
            self.saving = SaveSession(self.model, precopy=precopy,
                                      precopy_size=self.precopy_size)
            file = SavingFile(self, self.saving)
        elif nxt == S.STOP_COPY:
            assert self.saving is not None      # PRE_COPY(_P2P) -> STOP_COPY: same session
            self.saving.enter_stop_copy()
        elif cur in SAVING_STATES and nxt not in SAVING_STATES:
            self._end_sessions()
        elif nxt == S.RESUMING:
            self.resuming = LoadSession(self.model, self.name)
            file = ResumingFile(self, self.resuming)
        self.state = nxt
        self.arcs.append((cur, nxt))
        return file

    def _end_sessions(self) -> None:
        for session in (self.saving, self.resuming):
            if session is not None:
                session.end()
        self.saving = self.resuming = None

    def _enter_error(self) -> None:
        self._end_sessions()
        self.state = S.ERROR
        self.model.running = False

    # -- Resettable ------------------------------------------------------------------------
    def reset(self) -> None:
        """VFIO_DEVICE_RESET or last close: RUNNING, sessions ended (old fds answer ENODEV),
        the hardware back to its power-on state."""
        self._end_sessions()
        self.state = S.RUNNING
        self.model.power_on()
