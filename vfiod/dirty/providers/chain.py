"""A container's provider with its fallbacks (docs/architecture.md §3; docs/kernel-contract.md §7, §11).

``select`` orders the usable providers best first, ending with "none". ``ProviderChain``
runs the first that starts, and moves down the chain when one turns out unavailable
(EOPNOTSUPP/ENOTTY at START, or later at REPORT: the 6.12 guest kernel starts device
logging and then refuses every REPORT). "none" never fails, so a container always has a
provider and a migration never fails for lack of dirty tracking; it only gets slower and
the status says why.

After a REPORT failure the log may be lost (docs/kernel-contract.md §7: "treat the whole log as
lost"), so the caller must count the whole container as dirty for that sync. It must do
so *after* ``fallback``/``restart`` returns: every write then either happened before the
all-dirty marking (and the page will be sent after it) or after the new START (and the
new provider reports it). Nothing in between is missed.
"""

from __future__ import annotations

from collections.abc import Sequence

from vfiod.dirty.providers.base import DirtyProvider, IovaRange, ProviderUnavailable
from vfiod.dirty.providers.select import Selection
from vfiod.errors import KernelError


class ProviderChain:
    def __init__(self, selection: Selection, target: str) -> None:
        if not selection.chain:
            raise ValueError(f"dirty tracking on {target}: empty provider chain")
        self.chain = list(selection.chain)
        self.notes = list(selection.notes)
        self.target = target
        self.index = 0
        self.running = False
        self.page_size: int | None = None
        #: "device-logging -> type1: <why>" for every move down the chain
        self.fallbacks: list[str] = []
        #: errors that were handled (restart, fallback, failed STOP)
        self.errors: list[str] = []

    @property
    def current(self) -> DirtyProvider:
        return self.chain[self.index]

    @property
    def name(self) -> str:
        return self.current.name

    def start(self, ranges: Sequence[IovaRange], page_size: int) -> int:
        """Start the best provider that starts; returns its bitmap page size."""
        for name, why in self._start_from(0, ranges, page_size):
            self.fallbacks.append(f"{name} -> {self.name}: {why}")
        assert self.page_size is not None
        return self.page_size

    def _start_from(self, index: int, ranges: Sequence[IovaRange],
                    page_size: int) -> list[tuple[str, str]]:
        """Start chain[index], else the next...; returns (name, why) of those skipped."""
        skipped: list[tuple[str, str]] = []
        last = len(self.chain) - 1
        for i in range(index, last + 1):
            p = self.chain[i]
            try:
                self.page_size = p.start(ranges, page_size)
            except ProviderUnavailable as e:
                skipped.append((p.name, str(e)))
                continue
            except KernelError as e:
                if i == last:
                    raise
                skipped.append((p.name, f"START failed: {e}"))
                self.errors.append(f"{p.name} START failed: {e}")
                continue
            self.index = i
            self.running = True
            return skipped
        raise RuntimeError(f"dirty tracking on {self.target}: no provider started")

    def fallback(self, why: str, ranges: Sequence[IovaRange], page_size: int) -> None:
        """The current provider is unavailable: stop it and start the next one."""
        prev = self.name
        self._stop_quietly()
        if self.index == len(self.chain) - 1:   # "none" never reports unavailable
            raise RuntimeError(f"dirty tracking on {self.target}: nothing to fall back to")
        skipped = self._start_from(self.index + 1, ranges, page_size)
        self.fallbacks.append(f"{prev} -> {self.name}: {why}")
        self.fallbacks.extend(f"{n} skipped: {w}" for n, w in skipped)

    def restart(self, why: str, ranges: Sequence[IovaRange], page_size: int) -> None:
        """The current provider failed in a way that may have lost its log: stop and
        start it again (or, if it will not start, the next one down the chain)."""
        prev = self.name
        self.errors.append(why)
        self._stop_quietly()
        skipped = self._start_from(self.index, ranges, page_size)
        if self.name != prev:
            self.fallbacks.append(f"{prev} -> {self.name}: {why}; restart refused: "
                                  + "; ".join(w for _, w in skipped))

    def _stop_quietly(self) -> None:
        try:
            self.current.stop()
        except KernelError as e:
            self.errors.append(f"{self.name} STOP failed: {e}")
        self.running = False

    def stop(self) -> None:
        """Stop the running provider; raises its STOP error (after recording it)."""
        if not self.running:
            return
        self.running = False
        try:
            self.current.stop()
        except KernelError as e:
            self.errors.append(f"{self.name} STOP failed: {e}")
            raise
