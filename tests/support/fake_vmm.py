"""A VMM that migrates guest RAM beside vfiod, in-process, for the coordinated-switchover
session tests (docs/architecture.md §8.3; the contract: vfiod/migration/session/
vmm_half.py). ``FakeVmm`` is both halves at once: the source QEMU and the destination one.

Like QEMU it sends all of RAM in a first pass, and then what its vCPUs dirtied; unlike it,
the first pass is read when the migration starts but written to the destination only at
completion: the stalest order a real VMM can deliver pages in, so a device-written page
that vfiod put into guest RAM before the VMM finished would be overwritten (what the
destination's shadow prevents). Its vCPUs write a counter into ``vcpu_pages`` (some of
them pages the devices write too) on a thread until ``switch_after`` writes, then it
stops them and waits before its switchover; ``continue_switchover`` copies the first pass
and every page its vCPUs wrote, reading the source RAM at that moment.

``fail`` makes it misbehave: ``"source"`` ends its migration failed before the switchover
(the destination QEMU went away); ``"incoming"`` completes on the source but the
destination's incoming migration fails (it died during the final pass).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from vfiod.migration.guest import Guest
from vfiod.migration.session.vmm_half import VmmProgress


def _memory(guest: Guest) -> np.ndarray:
    (block,) = guest.ram                       # the tests use one RAM region
    return np.frombuffer(block.view(), dtype=np.uint8)


class FakeVmm:
    incoming = "tcp:0.0.0.0:4444"

    def __init__(self, src: Guest, dst: Guest, vcpu_pages: list[int], *,
                 switch_after: int = 200, fail: str = "") -> None:
        self.src, self.dst = _memory(src), _memory(dst)
        self.page = src.page_size
        self.vcpu_pages = vcpu_pages
        self.switch_after = switch_after
        self.fail = fail
        self.status = "none"
        #: the RAM rate it reports: its final pass then takes remaining / rate (the faster
        #: of it and vfiod's link estimate)
        self.bandwidth_bps = 1e12          # faster than any link vfiod measures
        self.uri = ""
        self.calls: list[str] = []
        self.vcpu_writes = 0
        self._first_pass: np.ndarray | None = None
        self._dirty: set[int] = set()
        self._done = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- source half --------------------------------------------------------------------
    def start(self, incoming: str) -> None:
        self.calls.append("start")
        self.uri = incoming
        self._first_pass = self.src.copy()
        self.status = "active"
        self._thread = threading.Thread(target=self._vcpus, name="fake-vcpus", daemon=True)
        self._thread.start()

    def _vcpus(self) -> None:
        rng = np.random.default_rng(7)
        while not self._stop.is_set() and self.vcpu_writes < self.switch_after:
            p = int(rng.choice(self.vcpu_pages))
            at = p * self.page
            self.vcpu_writes += 1
            self.src[at:at + 8] = np.frombuffer(self.vcpu_writes.to_bytes(8, "little"),
                                                dtype=np.uint8)
            self._dirty.add(p)
            self._stop.wait(0.0005)             # a vCPU's pace, not a wait for anything
        if self._stop.is_set():
            return
        self.status = "failed" if self.fail == "source" else "pre-switchover"

    def progress(self) -> VmmProgress:
        self.calls.append("progress")
        return VmmProgress(self.status, remaining_bytes=len(self._dirty) * self.page,
                           bandwidth_bps=self.bandwidth_bps)

    def continue_switchover(self) -> None:
        self.calls.append("continue")
        if self.status != "pre-switchover":
            raise RuntimeError(f"migrate-continue in state {self.status}")
        assert self._first_pass is not None
        self.dst[:] = self._first_pass          # late and stale: read at the start
        for p in self._dirty:
            at = p * self.page
            self.dst[at:at + self.page] = self.src[at:at + self.page]
        self.status = "completed"
        self._done.set()

    def completed(self) -> VmmProgress:
        self.calls.append("completed")
        return VmmProgress(self.status, downtime_s=0.003, total_s=0.5)

    def abandon(self) -> VmmProgress:
        self.calls.append("abandon")
        self._stop.set()
        if self.status in ("active", "pre-switchover"):
            self.status = "cancelled"
        self._done.set()
        return VmmProgress(self.status)

    # -- destination half ---------------------------------------------------------------
    def await_incoming(self) -> VmmProgress:
        self.calls.append("await_incoming")
        if not self._done.wait(30):
            raise TimeoutError("the fake VMM's incoming migration did not complete")
        if self.fail == "incoming" or self.status != "completed":
            raise RuntimeError(f"QEMU's incoming migration failed ({self.status})")
        return VmmProgress("completed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        # views of guest RAM: a guest cannot unmap its RAM while they exist
        self.src = self.dst = np.empty(0, dtype=np.uint8)

    def __enter__(self) -> FakeVmm:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
