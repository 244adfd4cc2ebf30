"""The VMM's half of a coordinated migration (docs/architecture.md §8.3).

QEMU migrates the vCPU state and the RAM its vCPUs dirtied; vfiod migrates the devices'
state and the pages their DMA dirtied. ``VmmSourceHalf`` and ``VmmDestinationHalf`` are
what a session needs of the VMM's own migration; ``vfiod/daemon/runstate/
qemu_migration.py`` implements them over QMP. The session's side of the contract:

- **Source.** Dirty tracking starts before the VMM's migration does (``start``), with no
  page dirty: the VMM sends all of RAM, and every page a device writes from then on is
  kept dirty until the switchover (pre-copy sends only device state). The VMM decides
  when to switch over: it stops the vCPUs and waits (``progress().status ==
  "pre-switchover"``); the session then pauses the guest, lets the VMM finish
  (``continue_switchover``) and runs its own stop-and-copy beside it, sending every page
  its devices wrote since tracking started, read now that nothing runs. Any failure
  before the commit ``abandon``s the VMM's migration (its vCPUs run again here).
- **Destination.** RAM records land in a shadow copy, not in guest RAM: the VMM writes
  guest RAM during its migration and would overwrite them. Once the VMM's incoming
  migration completed (``await_incoming``), the shadow's pages are copied into guest RAM,
  so the device-written pages win; they hold the source's RAM at the pause, which
  includes what the vCPUs wrote to the same pages. Only after the commit does the
  guest's run-state handler let the VMM run the vCPUs.

Every call is bounded by the implementation's own deadline and raises a ``VfiodError``
naming what the VMM said; the session treats it like any failure before the commit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

#: the VMM's migration is still running (QEMU's ``query-migrate`` status names)
VMM_MIGRATING = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug",
                           "cancelling"})


@dataclass(frozen=True)
class VmmProgress:
    """The VMM's migration as it reports it (QEMU: ``query-migrate``); times in seconds,
    None where the VMM has not said."""

    status: str
    remaining_bytes: int = 0
    transferred_bytes: int = 0
    expected_downtime_s: float | None = None
    downtime_s: float | None = None
    total_s: float | None = None
    error: str = ""
    #: the rate its RAM moves at, bytes per second
    bandwidth_bps: float | None = None

    @property
    def migrating(self) -> bool:
        return self.status in VMM_MIGRATING

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class VmmSourceHalf(Protocol):
    def start(self, incoming: str) -> None:
        """Start the VMM's migration to the destination VMM listening at ``incoming``
        (what the destination's ACK hello says), paused before its switchover."""
        ...

    def progress(self) -> VmmProgress:
        """Its migration now."""
        ...

    def continue_switchover(self) -> None:
        """Let a VMM waiting before its switchover finish its migration."""
        ...

    def completed(self) -> VmmProgress:
        """Its final figures (downtime, total time), once it completed."""
        ...

    def abandon(self) -> VmmProgress:
        """Cancel its migration if it still runs and wait until it ended; the vCPUs then
        run again here (the VMM restarts them, or the guest's resume does)."""
        ...


@runtime_checkable
class VmmDestinationHalf(Protocol):
    #: where this host's VMM listens for the incoming migration (e.g. ``tcp:0.0.0.0:4444``)
    incoming: str

    def await_incoming(self) -> VmmProgress:
        """Block until the VMM's incoming migration completed (its RAM is loaded, its
        vCPUs wait); raises if it failed or the VMM went away."""
        ...
