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


Event = RamLoaded | DeviceData | EndOfState | IterationMark | Complete
