"""How the writer frames a batch of guest-page pieces as RAM and RAM_RUNS records
(docs/protocol.md §5.2, §5.4).

Every piece is a run of pages of one region, at most a record long. A piece of at least
``GROUP_BELOW_PAGES`` keeps a RAM record of its own, received straight into guest memory.
Shorter pieces, consecutive in the batch, of one region, ascending and disjoint, share a
RAM_RUNS record of up to a record's pages and ``Limits.ram_runs`` runs: a record costs
both ends a header, a table, CRC calls and Python work. A pass of scattered single pages
took 42 µs of both ends' CPU per page as one record each, 10 µs in RAM_RUNS records
(``stream_scattered_pass_2000``, docs/benchmarks.md §3.4).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from vfiod.migration.stream.crc32c import crc32c
from vfiod.migration.stream.pagecrc import page_crcs, page_crcs_at
from vfiod.migration.stream.ram import GuestRam
from vfiod.migration.stream.records import RecordType, pack_header

#: Linux IOV_MAX is 1024; keep a margin (a RAM record adds three entries, a RAM_RUNS
#: record three plus one per run)
MAX_IOV = 1000
#: pieces of one send batch, so that any framing of them fits ``MAX_IOV``
BATCH_PIECES = MAX_IOV // 3
#: a pass's last record is at most this many pages (256 KiB of 4 KiB pages): ``tapered``
TAIL_PAGES = 64
#: pieces shorter than this (256 KiB of 4 KiB pages) share RAM_RUNS records; longer ones
#: would gain nothing from sharing and would cost the RAM_RUNS copy at the destination
GROUP_BELOW_PAGES = 64

Piece = tuple[int, int, int, memoryview]   # region index, first page, count, guest memory


def piece_tables(ram: GuestRam, batch: list[Piece]) -> tuple[np.ndarray, list[int]]:
    """The per-page CRCs of every piece of ``batch``, one piece after the other, and
    where each piece's begin. Consecutive short pieces of one region take one call
    (``page_crcs_at``): a call per piece cost more than the CRCs of a page or two."""
    ps = ram.page_size
    counts = [n for _, _, n, _ in batch]
    starts = [0, *itertools.accumulate(counts)]
    out = np.empty(starts[-1], dtype=np.uint32)
    i = 0
    while i < len(batch):
        idx, _, n, view = batch[i]
        j = i + 1
        if n < GROUP_BELOW_PAGES:
            while j < len(batch) and batch[j][0] == idx and batch[j][2] < GROUP_BELOW_PAGES:
                j += 1
        if j == i + 1:
            page_crcs(view, ps, out[starts[i]:starts[j]])
        else:
            first, region = ram.region_pages(idx)
            f = np.array([p[1] for p in batch[i:j]], dtype=np.int64) - first
            c = np.array(counts[i:j], dtype=np.int64)
            pages = np.repeat(f - (np.cumsum(c) - c), c) + np.arange(starts[j] - starts[i])
            out[starts[i]:starts[j]] = page_crcs_at(region, pages, ps)
        i = j
    return out, starts


def groups(batch: list[Piece], record_pages: int, max_runs: int,
           below: int = GROUP_BELOW_PAGES, tail_pages: int = 0) -> list[list[int]]:
    """The records of ``batch``, each as the indexes of its pieces: a single piece is a
    RAM record, several a RAM_RUNS record; pieces of ``below`` pages or more (0: all)
    travel alone. ``tail_pages``: the batch ends a pass, and its last group keeps only
    its last pieces of at most that many pages in all (``tapered`` says why)."""
    out: list[list[int]] = []
    group: list[int] = []
    pages = 0
    for i, (idx, page, n, _) in enumerate(batch):
        if group:
            gi, gp, gn, _ = batch[group[-1]]
            if (n >= below or idx != gi or page < gp + gn
                    or pages + n > record_pages or len(group) >= max_runs):
                out.append(group)
                group, pages = [], 0
        if n >= below:
            out.append([i])
        else:
            group.append(i)
            pages += n
    if group:
        out.append(group)
    if tail_pages and out and len(out[-1]) > 1:
        last, pages, cut = out[-1], 0, len(out[-1])
        while cut > 1 and pages + batch[last[cut - 1]][2] <= tail_pages:
            cut -= 1
            pages += batch[last[cut]][2]
        if 0 < cut < len(last):
            out[-1:] = [last[:cut], last[cut:]]
    return out


def ram_record(piece: Piece, table: np.ndarray, seq: int,
               flags: int) -> tuple[tuple[Any, ...], int, int]:
    """A RAM record's buffers (header, CRC table, pages), its payload length and its
    payload CRC (over the CRC table)."""
    _, page, n, view = piece
    length = n * 4 + len(view)
    crc = crc32c(table)
    head = pack_header(RecordType.RAM, seq & 0xFFFFFFFF, length, page, n, crc, flags)
    return (head, memoryview(table).cast("B"), view), length, crc  # type: ignore[arg-type]


def ram_runs_record(pieces: list[Piece], table: np.ndarray, seq: int,
                    flags: int) -> tuple[tuple[Any, ...], int, int]:
    """A RAM_RUNS record's buffers (header, run table, CRC table: the pieces' page CRCs
    one piece after the other, the pieces' pages), its payload length and its payload
    CRC (over both tables)."""
    runs = np.array([(p[1], p[2]) for p in pieces], dtype="<u8")
    crc = crc32c(table, crc32c(runs))
    length = runs.nbytes + table.nbytes + sum(len(p[3]) for p in pieces)
    head = pack_header(RecordType.RAM_RUNS, seq & 0xFFFFFFFF, length, len(pieces),
                       len(table), crc, flags)
    return (head, memoryview(runs).cast("B"), memoryview(table).cast("B"),  # type: ignore[arg-type]
            *(p[3] for p in pieces)), length, crc


def tapered(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` with the last run's final ``TAIL_PAGES`` cut off as a run of their own,
    so that a pass's last record is short. The destination checks a record's pages
    once all of them arrived, so the last record's check is the pass's tail, inside the
    downtime for the final pass; the record before it is checked while the short tail
    is still on the wire. In the prediction bench's capped regimes the destination
    verified the MANIFEST 1.8-3.7 ms after the source sent it, 0.65-1.0 ms with this and
    one event per RAM_RUNS record (docs/benchmarks.md §3.4)."""
    if ranges and ranges[-1][1] > TAIL_PAGES:
        first, count = ranges[-1]
        return [*ranges[:-1], (first, count - TAIL_PAGES),
                (first + count - TAIL_PAGES, TAIL_PAGES)]
    return ranges
