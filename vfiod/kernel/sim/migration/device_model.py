"""The internal state of one simulated migratable device (what docs/kernel-contract.md §6.4 calls
"internal state change" and §5.5/§6.7 stream out).

A ``DeviceModel`` is ``spec.state_size`` bytes of device state plus a tick counter. While
the device runs, ``tick(n)`` rewrites ``spec.dirty_rate`` bytes per tick, so a pre-copy
session always has something to chase; once the device is stopped (STOP, STOP_COPY,
RESUMING, v1 ``_RUNNING`` clear) ticks change nothing. Everything is deterministic: the
power-on bytes come from ``spec.seed``, and the bytes tick *k* writes depend only on
(seed, k) -- so a device restored on a destination continues exactly as the source would
have.

The state is split into ``CHUNK``-byte chunks. Saving sessions register an *observer*
(a set) with ``observe()``; every chunk a tick rewrites is added to every observer, which
is how a session knows what was re-dirtied since it last streamed that chunk.

``digest()`` (and ``==``) compare (seed, ticks, state): a test proves that state saved on
one simulated device and restored into a second one is equal.
"""

from __future__ import annotations

import hashlib
import random
import struct
import threading
from dataclasses import dataclass

from vfiod.kernel.sim.interfaces import DeviceSpec

#: Granule of dirty tracking inside the model and of STATE records in the stream.
CHUNK = 4096

_SNAPSHOT = struct.Struct("<QQQ")   # seed, ticks, state length


@dataclass(frozen=True)
class DeviceIdentity:
    """What makes two devices the same *kind* (a stream from one loads into the other).
    The name is not part of it: source and destination have different names."""

    vendor: int
    device: int
    state_size: int

    def pack(self) -> bytes:
        return struct.pack("<HHQ", self.vendor, self.device, self.state_size)

    def __str__(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}/{self.state_size}B"


def extra_int(spec: DeviceSpec, key: str, default: int | None) -> int | None:
    """``spec.extra[key]`` as an int (``default`` when absent); anything else is a clear
    ValueError naming the device and the key."""
    value = spec.extra.get(key, default)
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"{spec.name}: extra[{key!r}] must be an int, not {value!r}")


def _power_on_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


class DeviceModel:
    """Device state that changes while running; see the module docstring."""

    def __init__(self, spec: DeviceSpec) -> None:
        if spec.state_size <= 0:
            raise ValueError(f"{spec.name}: state_size must be > 0, not {spec.state_size}")
        if spec.dirty_rate < 0:
            raise ValueError(f"{spec.name}: dirty_rate must be >= 0, not {spec.dirty_rate}")
        if spec.seed < 0:
            raise ValueError(f"{spec.name}: seed must be >= 0, not {spec.seed}")
        self.name = spec.name
        self.identity = DeviceIdentity(spec.vendor, spec.device, spec.state_size)
        self.dirty_rate = spec.dirty_rate
        self._power_on_seed = spec.seed
        # One lock per model: a test or demo may tick from a thread while the simulated
        # kernel (under its own lock) streams chunks out of the same model.
        self._lock = threading.RLock()
        self._observers: list[set[int]] = []
        self.seed = spec.seed
        self.ticks = 0
        self.running = True
        self.state = bytearray(_power_on_bytes(spec.seed, spec.state_size))

    # -- geometry --------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.state)

    @property
    def nchunks(self) -> int:
        return -(-self.size // CHUNK)

    def chunk_len(self, index: int) -> int:
        return min(CHUNK, self.size - index * CHUNK)

    def chunk(self, index: int) -> bytes:
        with self._lock:
            return bytes(self.state[index * CHUNK:index * CHUNK + CHUNK])

    # -- running device --------------------------------------------------------------------
    def tick(self, n: int = 1) -> int:
        """Advance ``n`` ticks; returns the bytes rewritten (0 while stopped)."""
        if n < 0:
            raise ValueError(f"{self.name}: tick({n}): negative tick count")
        with self._lock:
            if not self.running or self.dirty_rate == 0:
                return 0
            for _ in range(n):
                self.ticks += 1
                self._mutate(self.ticks)
            return n * min(self.dirty_rate, self.size)

    def _mutate(self, tick_no: int) -> None:
        # Seeded by (seed, tick number) only, so a restored device continues identically.
        rng = random.Random((self.seed << 40) + tick_no)
        length = min(self.dirty_rate, self.size)
        start = rng.randrange(self.size)
        data = rng.randbytes(length)
        first = min(length, self.size - start)
        self.state[start:start + first] = data[:first]
        self._mark(start, first)
        if first < length:                        # wrap around the end of the state
            self.state[:length - first] = data[first:]
            self._mark(0, length - first)

    def _mark(self, start: int, length: int) -> None:
        if length <= 0 or not self._observers:
            return
        chunks = range(start // CHUNK, (start + length - 1) // CHUNK + 1)
        for obs in self._observers:
            obs.update(chunks)

    def _mark_all(self) -> None:
        self._mark(0, self.size)

    # -- observers (saving sessions) -------------------------------------------------------
    def observe(self) -> set[int]:
        """A new, empty set that from now on collects the index of every rewritten chunk."""
        obs: set[int] = set()
        with self._lock:
            self._observers.append(obs)
        return obs

    def unobserve(self, obs: set[int]) -> None:
        with self._lock:
            self._observers = [o for o in self._observers if o is not obs]

    # -- save / restore --------------------------------------------------------------------
    def save(self) -> bytes:
        """A snapshot (seed, ticks, state). Only a stopped device has a consistent one."""
        with self._lock:
            if self.running:
                raise RuntimeError(f"{self.name}: save() while the device is running; "
                                   "stop it first (STOP_COPY)")
            return _SNAPSHOT.pack(self.seed, self.ticks, self.size) + bytes(self.state)

    def restore(self, blob: bytes) -> None:
        """Load a ``save()`` snapshot of a device of the same size."""
        if len(blob) < _SNAPSHOT.size:
            raise ValueError(f"{self.name}: snapshot of {len(blob)} bytes is shorter than "
                             f"its {_SNAPSHOT.size}-byte header")
        seed, ticks, size = _SNAPSHOT.unpack_from(blob)
        if size != self.size or len(blob) != _SNAPSHOT.size + size:
            raise ValueError(f"{self.name}: snapshot holds {len(blob) - _SNAPSHOT.size} "
                             f"state bytes (header says {size}); this device has {self.size}")
        self.load(seed, ticks, blob[_SNAPSHOT.size:])

    def load(self, seed: int, ticks: int, state: bytes | bytearray) -> None:
        if len(state) != self.size:
            raise ValueError(f"{self.name}: {len(state)} state bytes for a "
                             f"{self.size}-byte device")
        with self._lock:
            self.seed, self.ticks = seed, ticks
            self.state[:] = state
            self._mark_all()

    def power_on(self) -> None:
        """What a reset does to the hardware: back to the seeded power-on state, running."""
        with self._lock:
            self.seed = self._power_on_seed
            self.ticks = 0
            self.running = True
            self.state[:] = _power_on_bytes(self.seed, self.size)
            self._mark_all()

    # -- comparison ------------------------------------------------------------------------
    def digest(self) -> str:
        with self._lock:
            return state_digest(self.seed, self.ticks, self.state).hex()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DeviceModel):
            return NotImplemented
        return self.identity == other.identity and self.digest() == other.digest()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        run = "running" if self.running else "stopped"
        return f"DeviceModel({self.name!r}, {self.identity}, ticks={self.ticks}, {run})"


def state_digest(seed: int, ticks: int, state: bytes | bytearray) -> bytes:
    """32-byte digest of a device state (the stream's END record carries it)."""
    h = hashlib.blake2b(digest_size=32)
    h.update(struct.pack("<QQ", seed, ticks))
    h.update(state)
    return h.digest()
