"""What the guest workload's vCPU wrote, read straight from a QEMU guest's RAM file
(native/qemu-guest/README.md has the page record).

Each workload page starts with a 16-byte magic, then its index, its guest-physical
address and its counter (u64 each, offsets 16/24/32). The scan looks at every 4 KiB page
start of the file at once with numpy. A record found at file offset X must say GPA X:
that is how guest-physical addresses map to the RAM file on q35 below 2.75 GiB
(checked here), and the scan refuses a file where it does not hold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PAGE = 4096
WORKLOAD_MAGIC = b"vfiod-workload!\0"
_WORDS = PAGE // 8
_MAGIC_WORDS = np.frombuffer(WORKLOAD_MAGIC, dtype="<u8")


class WorkloadScanError(AssertionError):
    """The RAM file's workload pages break the record's rules; says which page and how."""


def _records(ram_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(file page numbers, indexes, GPAs, counters) of every page holding the magic."""
    size = ram_path.stat().st_size
    if size == 0 or size % PAGE:
        raise WorkloadScanError(f"{ram_path}: size {size} is not a whole number of pages")
    words = np.memmap(ram_path, dtype="<u8", mode="r").reshape(-1, _WORDS)
    hit = np.flatnonzero((words[:, 0] == _MAGIC_WORDS[0]) & (words[:, 1] == _MAGIC_WORDS[1]))
    found = words[hit, 2:5].copy()
    del words
    return hit, found[:, 0], found[:, 1], found[:, 2]


def workload_pages(ram_path: Path) -> dict[int, int]:
    """Page index -> counter (the generation of the last sweep that wrote it), for every
    workload page in the RAM file. Raises ``WorkloadScanError`` for a record whose GPA is
    not its file offset or an index found twice."""
    where, indexes, gpas, counters = _records(ram_path)
    wrong = np.flatnonzero(gpas != where.astype(np.uint64) * PAGE)
    if wrong.size:
        i = wrong[0]
        raise WorkloadScanError(
            f"{ram_path}: workload page {indexes[i]} at file offset {int(where[i]) * PAGE:#x} "
            f"says GPA {int(gpas[i]):#x} ({wrong.size} such pages): GPA != RAM file offset")
    unique, counts = np.unique(indexes, return_counts=True)
    if (counts > 1).any():
        raise WorkloadScanError(f"{ram_path}: workload page index "
                                f"{int(unique[counts > 1][0])} found more than once")
    return {int(i): int(c) for i, c in zip(indexes, counters, strict=True)}


def workload_problems(pages: dict[int, int], expected: int) -> list[str]:
    """What is wrong with one snapshot of ``expected`` workload pages, as sentences (empty
    if nothing). A sweep writes pages in index order, so a whole snapshot holds
    generation g+1 on a prefix and g on the rest: any page missing, any counter that
    rises along the index, or a spread above one means a write was lost."""
    problems = []
    missing = sorted(set(range(expected)) - pages.keys())
    if missing:
        problems.append(f"{len(missing)} of {expected} workload pages missing "
                        f"(first: {missing[:5]})")
    extra = sorted(pages.keys() - set(range(expected)))
    if extra:
        problems.append(f"unexpected workload page indexes {extra[:5]}")
    counters = np.array([pages[i] for i in sorted(pages) if i < expected], dtype=np.int64)
    if counters.size:
        rising = np.flatnonzero(np.diff(counters) > 0)
        if rising.size:
            i = int(rising[0])
            problems.append(f"page {i + 1} holds generation {counters[i + 1]} but page {i} "
                            f"only {counters[i]}: a write to page {i} was lost")
        if counters.max() - counters.min() > 1:
            problems.append(f"generations span {counters.min()}..{counters.max()}: more "
                            "than one sweep apart")
        if counters.max() == 0:
            problems.append("no sweep has run yet (every counter is 0)")
    return problems


def differing_pages(a_path: Path, b_path: Path) -> list[int]:
    """Numbers of the 4 KiB pages in which two RAM files of one size differ."""
    a = np.memmap(a_path, dtype="<u8", mode="r")
    b = np.memmap(b_path, dtype="<u8", mode="r")
    if a.size != b.size or a.size % _WORDS:
        raise WorkloadScanError(f"{a_path} and {b_path}: not two RAM files of one size")
    differ = (a.reshape(-1, _WORDS) != b.reshape(-1, _WORDS)).any(axis=1)
    return [int(p) for p in np.flatnonzero(differ)]
