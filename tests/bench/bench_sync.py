"""sync_1tib_4containers: one full dirty sync of a 1 TiB guest behind 4 type1 containers.

HOOK, NOT YET MEASURED. It needs the simulated kernel's type1 container with dirty
tracking (``VFIO_IOMMU_DIRTY_PAGES``, vfio-uapi.md §3.9) and the container dirty provider
in ``vfiod/dirty/`` (both being written by other tasks). Until they exist this benchmark
raises ``BenchSkip`` and ``make bench`` reports it as skipped on stderr.

What it is to measure once they exist: a guest of 2^28 4 KiB pages mapped as 4 containers
(mapping starts not multiples of 64 pages), tracking started, a known random 1% of pages
dirtied through the simulator; time one sync = GET_BITMAP on each container + merge of the
four bitmaps into a ``GlobalBitmap`` + ``runs()``. Baseline: the same with the numpy
reference (``bitmap_ref.or_merge`` / ``dirty_runs``); ratio = reference / kernel time.
Check the merged runs equal the dirtied pages before reporting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.bench.timing import BenchSkip


def sync_1tib_4containers(size_log2: int, reps: int) -> list[dict[str, Any]]:
    raise BenchSkip("needs the simulated type1 container with VFIO_IOMMU_DIRTY_PAGES and the "
                    "container dirty provider (vfiod/dirty/); implement here as the module "
                    "docstring describes once they exist")


def benchmarks() -> list[tuple[str, Callable[..., Any]]]:
    return [("sync_1tib_4containers", sync_1tib_4containers)]
