"""What a dirty tracker reports: the result of each sync and a snapshot of its state
(docs/architecture.md §3, §4 prediction inputs; §6 status). Plain frozen data, no locks, no I/O: the
predictor reads the fields, and whoever displays status formats them.

``SyncResult`` counts the containers the pre-copy opt-out skipped (``skipped``) as wholly
dirty in ``dirty_pages`` (``assumed_dirty_pages``, an upper bound) without putting them in
the bitmap; ``lost`` names the containers counted wholly dirty after a provider error.
"""

from __future__ import annotations

from dataclasses import dataclass

from vfiod.dirty.container_tracking import ContainerTracking


@dataclass(frozen=True)
class SyncResult:
    phase: str
    dirty_pages: int            # guest pages dirty in the global bitmap after this sync
    dirty_bytes: int
    new_dirty_pages: int        # pages reported dirty by this sync (all containers)
    new_dirty_bytes: int
    duration_s: float           # measured with the tracker's clock
    providers: dict[str, str]   # container -> provider name used
    skipped: dict[str, str]     # container -> why it was not queried (counted all dirty)
    lost: dict[str, str]        # container -> why it counted all dirty after an error
    #: pages of opted-out containers not queried this sync: counted dirty (an upper bound,
    #: overlaps with the bitmap are not subtracted) but not in the bitmap, so pre-copy does
    #: not re-send them every pass; the stop-and-copy query collects what really changed.
    assumed_dirty_pages: int
    assumed_dirty_bytes: int
    #: of new_dirty_pages, those an opted-out container reported (its first query, in
    #: stop-and-copy: what its devices wrote since tracking began), and its mapped pages
    opted_out_new_pages: int = 0
    opted_out_mapped_pages: int = 0


@dataclass(frozen=True)
class ContainerStatus:
    """One container's tracking; provider fields are None before the tracker started."""

    name: str
    tracker: str | None             # the provider tracking it now
    precise: bool | None            # it reports only what was written
    page_size: int | None           # the provider's IOMMU page
    reason: str                     # why this provider (or "not started")
    running: bool
    mapped_bytes: int
    mappings: int
    opt_out_devices: tuple[str, ...]
    opt_out_active: bool            # the opt-out skips its query now
    last_sync: str                  # what the latest sync did with it
    fallbacks: tuple[str, ...]
    errors: tuple[str, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class TrackerStatus:
    running: bool
    page_size: int
    guest_pages: int
    dirty_pages: int
    syncs: int
    dirty_rate_bytes_per_s: float | None
    dirty_rate_smoothed_bytes_per_s: float | None
    containers: tuple[ContainerStatus, ...]


def container_status(box: ContainerTracking, blockers: list[str]) -> ContainerStatus:
    """``box`` now; ``blockers``: the devices whose opt-out skips its query now."""
    c = box.chain
    return ContainerStatus(
        name=box.name,
        tracker=c.name if c else None,
        precise=c.current.precise if c else None,
        page_size=c.page_size if c else None,
        reason=c.current.reason if c else "not started",
        running=bool(c and c.running),
        mapped_bytes=sum(m.size for m in box.maps),
        mappings=len(box.maps),
        opt_out_devices=tuple(box.optout.devices),
        opt_out_active=bool(blockers),
        last_sync=box.last,
        fallbacks=tuple(c.fallbacks) if c else (),
        errors=tuple(c.errors) if c else (),
        notes=tuple(c.notes) if c else ())
