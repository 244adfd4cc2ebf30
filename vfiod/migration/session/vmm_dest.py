"""The destination session's steps when its migration is coordinated with the VMM's own
(docs/architecture.md §8.3; the contract: ``vmm_half.py``).

    hello      the ACK hello names the VMM's incoming address (``vmm_incoming``), which the
               source's VMM migrates to. Guest RAM is not zeroed: the VMM fills it.
    receive    RAM records land in a shadow: a fresh memfd per region, sparse, so it
               costs only the pages received. The digests are kept over the shadow, so
               verification compares exactly what vfiod moved.
    apply      after vfiod's own state was verified, wait for the VMM's incoming
               migration to complete, then copy every received page from the shadow into
               guest RAM: the device-written pages land after the VMM's copy of them.
               The wait is the VMM's share of the downtime (``vmm_incoming_wait_s``).

A discard leaves the VMM's guest paused as the run-state handler found it (a destination
VMM that waits with ``-S`` never runs a guest vfiod did not commit).
"""

from __future__ import annotations

from typing import Any

from vfiod.migration.guest.memory import RamBlock
from vfiod.migration.session.common import SessionBase
from vfiod.migration.session.vmm_half import VmmDestinationHalf


class DestVmmSteps(SessionBase):
    """Mixed into ``DestinationSession``; every step is plain RAM without a VMM half."""

    vmm: VmmDestinationHalf | None
    _shadow: list[RamBlock]
    _received_runs: list[tuple[int, int]]

    def _vmm_hello(self) -> dict[str, Any]:
        return {} if self.vmm is None else {"vmm_incoming": self.vmm.incoming}

    def _landing_blocks(self) -> list[RamBlock]:
        """Where RAM records land: guest RAM, or with a VMM half a new shadow of it."""
        g = self.guest
        if self.vmm is None:
            return list(g.ram)
        if not self._shadow:
            for b in g.ram:
                self._shadow.append(RamBlock.open(g.kernel, b.region,
                                                  label=f"vfiod-shadow-{g.name}-{b.name}"))
        return self._shadow

    def _landed(self, first_page: int, count: int) -> None:
        if self.vmm is not None:
            self._received_runs.append((first_page, count))

    def _landed_runs(self, runs: tuple[tuple[int, int], ...]) -> None:
        if self.vmm is not None:
            self._received_runs.extend(runs)

    def _vmm_apply(self) -> None:
        """Wait for the VMM's RAM, then put vfiod's pages over it."""
        if self.vmm is None:
            return
        t = self.result.timings
        t0 = self.clock()
        p = self.vmm.await_incoming()
        t1 = self.clock()
        t["vmm_incoming_wait_s"] = t1 - t0
        self.result.vmm["incoming"] = p.to_dict()
        g, size = self.guest, self.guest.page_size
        shadow = {b.gpa: b for b in self._shadow}
        pages = 0
        for first, count in self._received_runs:
            dst = g.block_at(first * size)
            start = first * size - dst.gpa
            end = start + count * size
            dst.view()[start:end] = shadow[dst.gpa].view()[start:end]
            pages += count
        t["vmm_apply_s"] = self.clock() - t1
        self.result.verification["vmm_applied_pages"] = pages

    def _close_shadow(self) -> None:
        for b in self._shadow:
            b.close()
        self._shadow.clear()
