"""Page ranges and page/byte arithmetic for dirty tracking (docs/architecture.md §3).

A range table is a pair of int64 numpy arrays ``(first, count)``: range ``r`` covers pages
``[first[r], first[r] + count[r])``. That is what ``dirty_runs`` produces and what the RAM
sender turns into (guest page, count, bytes) records (docs/architecture.md §5). ``PageRange`` is one
range with checked fields, for APIs that take a single range.

Everything here is vectorised numpy: tables have up to millions of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vfiod.dirty.bitmap_args import Pages, check_count, check_page_size


@dataclass(frozen=True, slots=True)
class PageRange:
    """Pages ``[first, first + count)``; both non-negative integers."""

    first: int
    count: int

    def __post_init__(self) -> None:
        check_count("PageRange", "first", self.first)
        check_count("PageRange", "count", self.count)

    @property
    def end(self) -> int:
        return self.first + self.count


def pages_to_bytes(pages: int, page_size: int) -> int:
    """Bytes in ``pages`` pages of ``page_size`` (a power of two)."""
    return check_count("pages_to_bytes", "pages", pages) * check_page_size(
        "pages_to_bytes", "page_size", page_size)


def bytes_to_pages(nbytes: int, page_size: int, *, round_up: bool = False) -> int:
    """Pages in ``nbytes``; a partial page is an error unless ``round_up`` (then it counts)."""
    n = check_count("bytes_to_pages", "nbytes", nbytes)
    ps = check_page_size("bytes_to_pages", "page_size", page_size)
    if n % ps and not round_up:
        raise ValueError(f"bytes_to_pages: {n} bytes is not a whole number of "
                         f"{ps}-byte pages")
    return (n + ps - 1) // ps


def _table(fn: str, first: object, count: object) -> tuple[Pages, Pages]:
    f = np.asarray(first)
    c = np.asarray(count)
    if f.ndim != 1 or c.ndim != 1 or f.shape != c.shape:
        raise ValueError(f"{fn}: first and count must be 1-D arrays of one length, got shapes "
                         f"{f.shape} and {c.shape}")
    if f.size and not (np.issubdtype(f.dtype, np.integer) and np.issubdtype(c.dtype, np.integer)):
        raise ValueError(f"{fn}: first and count must be integer arrays, got {f.dtype} and "
                         f"{c.dtype}")
    f = f.astype(np.int64, copy=False)
    c = c.astype(np.int64, copy=False)
    if f.size and (f.min() < 0 or c.min() < 0):
        raise ValueError(f"{fn}: negative page number or count in the table")
    return f, c


def merge_ranges(first: object, count: object) -> tuple[Pages, Pages]:
    """Sort and coalesce overlapping or touching ranges; empty ranges disappear."""
    f, c = _table("merge_ranges", first, count)
    keep = c > 0
    f, c = f[keep], c[keep]
    if f.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(f, kind="stable")
    f, end = f[order], f[order] + c[order]
    reach = np.maximum.accumulate(end)  # furthest page covered so far
    # a new range starts where a range begins beyond everything before it
    new = np.empty(f.size, dtype=bool)
    new[0] = True
    new[1:] = f[1:] > reach[:-1]
    starts = np.flatnonzero(new)
    lasts = np.append(starts[1:] - 1, f.size - 1)
    return f[starts], reach[lasts] - f[starts]


def split_ranges(first: object, count: object, max_pages: int) -> tuple[Pages, Pages]:
    """Cut every range into pieces of ``max_pages`` pages plus a shorter last piece.

    Order is kept; empty ranges disappear.
    """
    f, c = _table("split_ranges", first, count)
    mx = check_count("split_ranges", "max_pages", max_pages, minimum=1)
    pieces = (c + (mx - 1)) // mx
    which = np.repeat(np.arange(f.size), pieces)
    # index of each piece within its range: 0, 1, ... restarting at every range
    nth = np.arange(which.size, dtype=np.int64) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    return f[which] + nth * mx, np.minimum(mx, c[which] - nth * mx)


def total_pages(count: object) -> int:
    """Pages in a range table (its counts may overlap: this does not merge)."""
    return int(np.asarray(count, dtype=np.int64).sum())
