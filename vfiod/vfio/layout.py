"""The guest-physical memory layout that DMA maps onto: ``RamRegion``, one range of guest
RAM (docs/architecture.md §1 step 3, §3).

The one description of a RAM region in vfiod: the guest builder lays RAM out with it, the
dirty tracker sizes its global bitmap from it, and the stream's HEADER carries it to the
destination. It lives in this layer, below ``dirty`` and ``migration``, so that all of
them can name it; ``DmaMapping`` (``container.py``) says where a region is mapped for DMA.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RamRegion:
    """One range of guest-physical RAM: ``size`` bytes at guest address ``gpa``."""

    name: str
    gpa: int
    size: int

    def first_page(self, page_size: int) -> int:
        return self.gpa // page_size

    def pages(self, page_size: int) -> int:
        return self.size // page_size
