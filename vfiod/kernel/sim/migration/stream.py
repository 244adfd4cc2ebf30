"""The simulated device's migration data stream: what a saving session produces and a
resuming session consumes. Opaque to vfiod (docs/kernel-contract.md §6.7: "the stream is opaque;
bytes must be delivered in the same order; write segmentation need not match read
segmentation"); both the v2 data fd and the v1 data window carry it.

Format (little endian), so that a wrong, short, reordered or foreign stream is caught:

    header  32 B : magic "VFIODSIM", version u32, vendor u16, device u16,
                   state_size u64, reserved u32 x2
    records      : type u32, length u32, offset u64, then ``length`` payload bytes
        SETUP  (1): device-kind-specific setup data (the initial pre-copy bytes, like qat's
                    early compatibility data); its content is checked on load
        STATE  (2): one model chunk at ``offset``; later records overwrite earlier ones
        END    (3): seed u64, ticks u64, 32-byte digest of the final state

A PRE_COPY session starts with ``initial`` data = header + SETUP + a snapshot of every
chunk, with as many SETUP bytes as make it ``spec.precopy_size`` long (none if the
snapshot alone is longer; §6.8: initial_bytes starts non-zero and shrinks as it is read); then each chunk the running device rewrites is
``dirty`` data; STOP_COPY appends the chunks rewritten since they were streamed, and END.
A session opened directly in STOP_COPY streams header, empty SETUP, every chunk, END.
"""

from __future__ import annotations

import errno
import hashlib
import struct

from vfiod.kernel.sim.base import fail
from vfiod.kernel.sim.migration.device_model import CHUNK, DeviceIdentity, DeviceModel, state_digest

MAGIC = b"VFIODSIM"
VERSION = 1
HEADER = struct.Struct("<8sIHHQ8x")
RECORD = struct.Struct("<IIQ")
END_PAYLOAD = struct.Struct("<QQ32s")
REC_SETUP, REC_STATE, REC_END = 1, 2, 3
#: Largest record payload a loader buffers (a corrupt length must not eat memory).
MAX_RECORD = 64 << 20


def header(identity: DeviceIdentity) -> bytes:
    return HEADER.pack(MAGIC, VERSION, identity.vendor, identity.device, identity.state_size)


def setup_data(identity: DeviceIdentity, length: int) -> bytes:
    """Deterministic per-kind bytes: a destination of another kind sees a mismatch."""
    pattern = hashlib.blake2b(identity.pack(), digest_size=64).digest()
    return (pattern * (length // len(pattern) + 1))[:length]


def record(rtype: int, payload: bytes, offset: int = 0) -> bytes:
    return RECORD.pack(rtype, len(payload), offset) + payload


def minimal_initial(model: DeviceModel) -> int:
    """Bytes of header + empty SETUP + one STATE record per chunk."""
    return HEADER.size + RECORD.size * (1 + model.nchunks) + model.size


def full_stream_length(model: DeviceModel, setup_len: int = 0) -> int:
    return minimal_initial(model) + setup_len + RECORD.size + END_PAYLOAD.size


class SaveSession:
    """One saving session over ``model`` (opened by RUNNING->PRE_COPY, RUNNING_P2P->
    PRE_COPY_P2P or STOP->STOP_COPY; v1: setting ``_SAVING``)."""

    def __init__(self, model: DeviceModel, *, precopy: bool, precopy_size: int = 0) -> None:
        self.model = model
        self.ended = False
        self.stop_copy = False
        setup_len = max(0, precopy_size - minimal_initial(model)) if precopy else 0
        buf = bytearray(header(model.identity))
        buf += record(REC_SETUP, setup_data(model.identity, setup_len))
        # The snapshot and the observer are taken together under the model's lock, so a
        # tick lands either in the snapshot or in the dirty set, never in neither.
        with model._lock:
            for i in range(model.nchunks):
                buf += record(REC_STATE, model.chunk(i), i * CHUNK)
            self._dirty = model.observe()
        self._buf = buf
        self.initial_left = len(buf) if precopy else 0
        if not precopy:
            self.enter_stop_copy()

    # -- sizes (PRECOPY_INFO, MIG_DATA_SIZE, v1 pending_bytes) -----------------------------
    def _dirty_size(self) -> int:
        return sum(RECORD.size + self.model.chunk_len(i) for i in self._dirty)

    @property
    def dirty_bytes(self) -> int:
        """Re-dirtied device state not yet read (committed or still in the model)."""
        return len(self._buf) - self.initial_left + (0 if self.stop_copy else self._dirty_size())

    @property
    def pending(self) -> int:
        """Everything readable right now plus what is known to follow in this phase."""
        return len(self._buf) + (0 if self.stop_copy else self._dirty_size())

    def stop_copy_length(self) -> int:
        """What the session will still produce if the device is stopped now."""
        if self.stop_copy:
            return len(self._buf)
        return self.pending + RECORD.size + END_PAYLOAD.size

    # -- phases ----------------------------------------------------------------------------
    def enter_stop_copy(self) -> None:
        """The device is frozen: append every chunk rewritten since it was streamed, and
        END. (Call after the model stopped running.)"""
        if self.stop_copy:
            return
        self._take_dirty()
        m = self.model
        with m._lock:
            end = END_PAYLOAD.pack(m.seed, m.ticks, state_digest(m.seed, m.ticks, m.state))
        self._buf += record(REC_END, end)
        self.model.unobserve(self._dirty)
        self.initial_left = 0
        self.stop_copy = True

    def _take_dirty(self) -> None:
        with self.model._lock:
            chunks = sorted(self._dirty)
            self._dirty.clear()
            for i in chunks:
                self._buf += record(REC_STATE, self.model.chunk(i), i * CHUNK)

    def read(self, length: int) -> bytes:
        """Up to ``length`` bytes; b"" when nothing is available now (in PRE_COPY: a
        temporary end; in STOP_COPY: the end of the stream). Never mixes the initial part
        with later data in one read, so initial_bytes reaches 0 exactly."""
        if not self._buf and not self.stop_copy:
            self._take_dirty()
        take = length if self.initial_left == 0 else min(length, self.initial_left)
        out = bytes(self._buf[:take])
        del self._buf[:take]
        self.initial_left -= min(self.initial_left, len(out))
        return out

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.model.unobserve(self._dirty)
            self._buf.clear()


class LoadSession:
    """One resuming session: parses the stream as it is written, applies STATE records to
    a staging copy and hands the result to the model at RESUMING->STOP (``finish``).

    Errors found while writing (mtty style, docs/kernel-contract.md §9.1): a header of another device
    kind or protocol fails that ``write`` with EFAULT; bytes after END fail with ENOMEM.
    Anything else wrong is remembered and reported by ``finish`` with EINVAL, as is a
    short stream (no END) or one whose final digest does not match what was loaded.
    """

    def __init__(self, model: DeviceModel, target: str) -> None:
        self.model = model
        self.target = target
        self.ended = False
        self._buf = bytearray()
        self._header_ok = False
        self._setup_ok = False
        self._end: tuple[int, int, bytes] | None = None
        self._error: str | None = None
        self._bad_header = False
        self._staging = bytearray(model.size)
        self._covered = bytearray(model.nchunks)
        self.written = 0

    def write(self, data: bytes) -> int:
        op = "write(data_fd)"
        if self._bad_header:
            raise fail(errno.EFAULT, op, self.target, "stream header was rejected")
        if self._end is not None:
            raise fail(errno.ENOMEM, op, self.target,
                       f"{len(data)} bytes written after the end of the stream")
        self.written += len(data)
        if self._error is not None:
            return len(data)          # already doomed; RESUMING->STOP reports it
        self._buf += data
        self._parse(op)
        return len(data)

    def _parse(self, op: str) -> None:
        if not self._header_ok:
            if len(self._buf) < HEADER.size:
                return
            magic, version, vendor, device, size = HEADER.unpack_from(self._buf)
            ident = self.model.identity
            if (magic, version) != (MAGIC, VERSION) or \
                    DeviceIdentity(vendor, device, size) != ident:
                self._bad_header = True
                self._error = (f"stream header {magic!r} v{version} for "
                               f"{DeviceIdentity(vendor, device, size)}; this device is "
                               f"{ident} (v{VERSION})")
                raise fail(errno.EFAULT, op, self.target, self._error)
            self._header_ok = True
            del self._buf[:HEADER.size]
        while len(self._buf) >= RECORD.size and self._error is None:
            rtype, length, offset = RECORD.unpack_from(self._buf)
            if length > MAX_RECORD:
                self._error = f"record of {length} bytes exceeds {MAX_RECORD}"
                break
            if len(self._buf) < RECORD.size + length:
                return
            payload = bytes(self._buf[RECORD.size:RECORD.size + length])
            del self._buf[:RECORD.size + length]
            self._apply(rtype, payload, offset)
            if self._end is not None and self._buf:
                extra = len(self._buf)
                self._buf.clear()
                raise fail(errno.ENOMEM, op, self.target,
                           f"{extra} bytes beyond the end of the stream")

    def _apply(self, rtype: int, payload: bytes, offset: int) -> None:
        if rtype == REC_SETUP:
            if payload != setup_data(self.model.identity, len(payload)):
                self._error = "setup data does not belong to this device kind"
            self._setup_ok = True
        elif rtype == REC_STATE:
            index, rem = divmod(offset, CHUNK)
            if not self._setup_ok or rem or index >= self.model.nchunks or \
                    len(payload) != self.model.chunk_len(index):
                self._error = f"bad STATE record: {len(payload)} bytes at offset {offset}"
                return
            self._staging[offset:offset + len(payload)] = payload
            self._covered[index] = 1
        elif rtype == REC_END and len(payload) == END_PAYLOAD.size:
            self._end = END_PAYLOAD.unpack(payload)
        else:
            self._error = f"unknown record type {rtype} ({len(payload)} bytes)"

    def finish(self) -> None:
        """RESUMING->STOP: validate and restore the model, or raise EINVAL naming why."""
        op = "RESUMING->STOP (load device state)"
        if self._error is not None:
            raise fail(errno.EINVAL, op, self.target, self._error)
        if self._end is None:
            raise fail(errno.EINVAL, op, self.target,
                       f"short stream: {self.written} bytes and no END record")
        if not all(self._covered):
            missing = self._covered.count(0)
            raise fail(errno.EINVAL, op, self.target, f"{missing} state chunks never sent")
        seed, ticks, digest = self._end
        if state_digest(seed, ticks, self._staging) != digest:
            raise fail(errno.EINVAL, op, self.target, "final state digest mismatch")
        self.model.load(seed, ticks, self._staging)

    def end(self) -> None:
        self.ended = True
        self._buf.clear()
