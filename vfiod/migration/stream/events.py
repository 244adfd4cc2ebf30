"""The events ``StreamReader.events()`` yields, in stream order (docs/architecture.md §5):
RAM that landed, device data, a device's END_OF_STATE, ITERATION marks, and the verified
MANIFEST."""

from __future__ import annotations

from dataclasses import dataclass

from vfiod.migration.stream.manifest import Manifest


@dataclass(frozen=True)
class RamLoaded:
    first_page: int
    count: int
    verified: bool = True  # False: a LIVE record the guest wrote during the send (torn.py)


@dataclass(frozen=True)
class RamRunsLoaded:
    """A RAM_RUNS record landed (docs/protocol.md §5.4): its runs, one event for all of
    them (a record of hundreds of short runs must not cost the destination an event per
    run after its last byte arrived)."""

    runs: tuple[tuple[int, int], ...]   # (first page, count), ascending
    torn: tuple[int, ...] = ()          # pages of a LIVE record the guest wrote (torn.py)

    @property
    def verified(self) -> bool:
        return not self.torn


@dataclass(frozen=True)
class DeviceData:
    device: str
    index: int
    chunk: int
    data: memoryview  # valid until the next event: consume it before iterating on


@dataclass(frozen=True)
class EndOfState:
    device: str
    index: int


@dataclass(frozen=True)
class IterationMark:
    number: int


@dataclass(frozen=True)
class Complete:
    manifest: Manifest


Event = RamLoaded | RamRunsLoaded | DeviceData | EndOfState | IterationMark | Complete
