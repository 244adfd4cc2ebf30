"""A simulated guest workload: devices DMA real bytes into guest RAM at a chosen rate
(docs/architecture.md §1, §3; docs/kernel-contract.md §3.9 and §7 for how the writes become dirty bits).

Each write goes through ``SimDevice.dma_write(iova, length, data)``: the IOMMU domain the
device is attached to translates it, the bytes land in the guest's memory behind the
mapping (``copy_to_user`` into the real mmap), and whoever tracks that device's DMA
(device DMA logging, type1 for emulated devices) marks the pages dirty. The devices'
internal state advances too (``DeviceModel.tick``), so device pre-copy has work to chase.

Deterministic from ``seed``: the sequence of writes (device, address, length, bytes) and
of device ticks is a function of the seed alone; only how far a time-paced run gets
depends on the clock. ``run_writes(n)`` performs exactly ``n`` writes synchronously (for
tests); ``start()`` runs paced writes in a background thread.

Locality like a real device: most writes go to a hot window (a ring of buffers) at the
start of each target, the rest anywhere in the target.

``pause()`` returns only once no write is in flight (what a guest's run-state handler
needs: after the guest is paused, nothing writes its memory); ``resume()`` continues;
``stop()`` ends the thread. Both wait on conditions with deadlines, never on sleeps.

``fill`` writes a guest's initial content (what its OS put in RAM before any migration):
CPU writes straight into memory, not DMA, since nothing tracks them yet.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from vfiod.kernel.sim.host import SimHost


@dataclass(frozen=True)
class DmaTarget:
    """``device`` writes into IOVA [iova, iova + size) (mapped on its container)."""

    device: str
    iova: int
    size: int
    weight: float = 1.0


@dataclass(frozen=True)
class WorkloadConfig:
    dirty_rate_bps: float = 32e6          # DMA bytes written per second (paced mode)
    min_write: int = 4096                 # each write: a page multiple in [min, max]
    max_write: int = 64 * 1024
    hot_fraction: float = 0.25            # the hot window: this share of each target
    hot_probability: float = 0.8          # share of writes that go to the hot window
    device_ticks_per_write: int = 1       # device state changes per DMA write
    page_size: int = 4096
    seed: int = 1

    def __post_init__(self) -> None:
        ps = self.page_size
        if self.dirty_rate_bps < 0:
            raise ValueError(f"workload: dirty rate {self.dirty_rate_bps} must be >= 0")
        if (self.min_write <= 0 or self.min_write % ps or self.max_write < self.min_write
                or self.max_write % ps):
            raise ValueError(f"workload: write sizes {self.min_write}..{self.max_write} must "
                             f"be page multiples (page {ps}) with min <= max")
        if not 0 < self.hot_fraction <= 1 or not 0 <= self.hot_probability <= 1:
            raise ValueError("workload: hot_fraction in (0, 1], hot_probability in [0, 1]")


class Workload:
    def __init__(self, host: SimHost, targets: Sequence[DmaTarget],
                 config: WorkloadConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = cfg = config or WorkloadConfig()
        if not targets:
            raise ValueError("workload: at least one DMA target is needed")
        for t in targets:
            host.device(t.device)                  # KeyError naming the device if unknown
            if t.iova % cfg.page_size or t.size < cfg.max_write or t.size % cfg.page_size:
                raise ValueError(f"workload: target {t.device} iova {t.iova:#x} size "
                                 f"{t.size:#x} must be page aligned and hold a "
                                 f"{cfg.max_write}-byte write")
            if t.weight <= 0:
                raise ValueError(f"workload: target {t.device} weight must be positive")
        self.host = host
        self.targets = list(targets)
        self._weights = [t.weight for t in targets]
        self._rng = random.Random(cfg.seed)
        self._clock = clock
        self._cv = threading.Condition()
        self._paused = False
        self._stopping = False
        self._in_write = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.writes = 0
        self.bytes_written = 0
        self.error: BaseException | None = None
        #: guest pages (by target device and iova page) written, when ``record`` is on
        self.record = False
        self.written: set[tuple[str, int]] = set()

    # -- one write ----------------------------------------------------------------------
    def _next(self) -> tuple[DmaTarget, int, bytes]:
        cfg, rng = self.config, self._rng
        t = rng.choices(self.targets, self._weights)[0]
        ps = cfg.page_size
        length = rng.randrange(cfg.min_write // ps, cfg.max_write // ps + 1) * ps
        span = t.size
        if rng.random() < cfg.hot_probability:
            span = max(length, int(t.size * cfg.hot_fraction) // ps * ps)
        off = rng.randrange(0, (span - length) // ps + 1) * ps
        return t, t.iova + off, rng.randbytes(length)

    def write_once(self) -> int:
        t, iova, data = self._next()
        dev = self.host.device(t.device)
        dev.dma_write(iova, len(data), data)
        model = getattr(dev.parts, "model", None)
        if model is not None and self.config.device_ticks_per_write:
            model.tick(self.config.device_ticks_per_write)
        self.writes += 1
        self.bytes_written += len(data)
        if self.record:
            ps = self.config.page_size
            self.written.update((t.device, p) for p in range(iova // ps,
                                                               (iova + len(data)) // ps))
        return len(data)

    def run_writes(self, n: int) -> int:
        """Exactly ``n`` writes now, on the caller's thread; returns the bytes written."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("workload: run_writes() while the background thread runs")
        return sum(self.write_once() for _ in range(n))

    # -- background thread --------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("workload: already started")
        self._thread = threading.Thread(target=self._loop, name="sim-workload", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        rate = self.config.dirty_rate_bps
        tokens = 0.0
        last = self._clock()
        try:
            while True:
                with self._cv:
                    while self._paused and not self._stopping:
                        self._cv.wait()
                        last = self._clock()           # no credit for the paused time
                    if self._stopping:
                        return
                now = self._clock()
                tokens = min(tokens + (now - last) * rate, float(self.config.max_write) * 4)
                last = now
                if rate <= 0 or tokens < self.config.max_write:
                    need = (self.config.max_write - tokens) / rate if rate > 0 else 0.1
                    self._wake.wait(min(need, 0.05))   # pacing, cut short by pause/stop
                    self._wake.clear()
                    continue
                with self._cv:
                    if self._paused or self._stopping:
                        continue
                    self._in_write = True
                try:
                    tokens -= self.write_once()
                finally:
                    with self._cv:
                        self._in_write = False
                        self._cv.notify_all()
        except BaseException as e:  # noqa: BLE001 - kept for stats(); the thread ends
            self.error = e
            with self._cv:
                self._in_write = False
                self._cv.notify_all()

    def _wait_idle(self, timeout: float, what: str) -> None:
        deadline = self._clock() + timeout
        while self._in_write:
            left = deadline - self._clock()
            if left <= 0:
                raise TimeoutError(f"workload: a DMA write was still in flight {timeout:g} s "
                                   f"after {what}")
            self._cv.wait(left)

    def pause(self, timeout: float = 10.0) -> None:
        """Stop writing; returns once no write is in flight."""
        with self._cv:
            self._paused = True
            self._wake.set()
            self._wait_idle(timeout, "pause()")

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def wait_for_writes(self, count: int, timeout: float = 10.0) -> None:
        """Block until at least ``count`` writes happened in total (the background
        thread's progress), or raise TimeoutError."""
        deadline = self._clock() + timeout
        with self._cv:
            while self.writes < count:
                if self.error is not None:
                    raise RuntimeError(f"workload failed: {self.error}") from self.error
                left = deadline - self._clock()
                if left <= 0:
                    raise TimeoutError(f"workload: {self.writes} of {count} writes after "
                                       f"{timeout:g} s (paused={self._paused})")
                self._cv.wait(left)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._wake.set()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"workload: thread still running {timeout:g} s after stop()")

    def on_run_state(self, old: Any, new: Any) -> None:
        """A guest run-state handler: RUNNING writes, any other state pauses."""
        if getattr(new, "name", new) == "RUNNING":
            self.resume()
        else:
            self.pause()

    def stats(self) -> dict[str, Any]:
        return {"writes": self.writes, "bytes_written": self.bytes_written,
                "dirty_rate_bps": self.config.dirty_rate_bps, "seed": self.config.seed,
                "paused": self._paused,
                "error": None if self.error is None else f"{type(self.error).__name__}: "
                                                           f"{self.error}"}


def fill(view: memoryview, nbytes: int, seed: int = 1, extent: int = 2 << 20,
         page_size: int = 4096) -> list[tuple[int, int]]:
    """Write ``nbytes`` of initial content into ``view`` as page-aligned extents of up to
    ``extent`` bytes spread over it (half random bytes, half a repeating pattern, like a
    booted OS's mix of data and text); returns the (offset, length) extents written."""
    size = len(view)
    if nbytes < 0 or nbytes > size:
        raise ValueError(f"fill: {nbytes} bytes into a {size}-byte region")
    extent = max(page_size, extent // page_size * page_size)
    nslots = size // extent
    want = -(-nbytes // extent)
    if want > nslots:
        raise ValueError(f"fill: {want} extents of {extent} bytes do not fit {size} bytes")
    rng = np.random.Generator(np.random.PCG64(seed))
    slots = np.sort(rng.choice(nslots, size=want, replace=False))
    out: list[tuple[int, int]] = []
    left = nbytes
    mv = view.cast("B") if view.format != "B" else view
    for i, slot in enumerate(slots.tolist()):
        n = min(extent, -(-left // page_size) * page_size)
        off = slot * extent
        if i % 2 == 0:
            mv[off:off + n] = rng.bytes(n)
        else:
            pattern = rng.bytes(256)
            mv[off:off + n] = (pattern * (n // 256 + 1))[:n]
        out.append((off, n))
        left -= n
    return out
