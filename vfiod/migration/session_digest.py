"""Content digests of guest RAM, kept current incrementally on both ends of a migration
(design.md §1 step 5 "destination verifies"; §5 manifest).

The stream's MANIFEST proves the destination received exactly the records the source sent.
This module proves the next thing: that the destination's RAM, once loaded, has the same
*content* as the source's RAM at the moment it stopped. Both ends keep one CRC-32C per
``chunk_bytes`` chunk of every RAM region (the stream's checksum; the SSE4.2 kernel runs at
several GB/s with the GIL released) and a region's digest is BLAKE2b-128 over its chunk
CRCs in order.

Incremental, so verification costs little downtime: a chunk is re-hashed only when pages
in it were sent (source) or received (destination) since its last hash. The source hashes
what it sent after each pre-copy pass and the final pass; the destination at each
ITERATION mark and after the MANIFEST. Chunks never touched keep the CRC of zeros: both
ends start from zeroed memory (a fresh memfd on the destination; pages the source skips
in its first pass are zero there at the time of the scan, and any later write is dirty).

What it proves and what it cannot: the destination's memory equals the source's memory *as
hashed*, so a record applied at the wrong place, a torn or stale pre-copy page that was not
re-sent, or a lost record all show up. A write the dirty tracker never reported leaves the
source's digest stale as well; only a full hash of both memories after the migration
(``full_ram_digest``, out of the downtime window) catches that, and the demo and the tests
run it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from vfiod.kernel.ops import KernelOps
from vfiod.migration.stream.crc32c import crc32c
from vfiod.migration.stream.header import RamRegion

DEFAULT_CHUNK = 64 * 1024
#: bytes read per pread when hashing a whole region (the full audit, the zero scan)
READ_PIECE = 8 << 20


@lru_cache(maxsize=8)
def zero_crc(length: int) -> int:
    return crc32c(bytes(length))


@dataclass(frozen=True)
class RegionDigest:
    name: str
    chunks: int
    digest: str

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "chunks": self.chunks, "digest": self.digest}

    @classmethod
    def from_dict(cls, d: object) -> RegionDigest:
        if not (isinstance(d, dict) and isinstance(d.get("name"), str)
                and isinstance(d.get("chunks"), int) and isinstance(d.get("digest"), str)):
            raise ValueError(f"region digest {d!r} needs name, chunks, digest")
        return cls(d["name"], d["chunks"], d["digest"])


def _root(crcs: np.ndarray) -> str:
    return hashlib.blake2b(crcs.astype("<u4").tobytes(), digest_size=16).hexdigest()


def _initial_crcs(size: int, chunk: int) -> np.ndarray:
    n = -(-size // chunk)
    crcs = np.full(n, zero_crc(chunk), dtype=np.uint32)
    tail = size - (n - 1) * chunk
    if tail != chunk:
        crcs[-1] = zero_crc(tail)
    return crcs


class RamDigests:
    """Per-chunk CRCs of each region over ``views`` (the RAM as this process maps it)."""

    def __init__(self, regions: Sequence[RamRegion], views: Sequence[memoryview],
                 page_size: int, chunk_bytes: int = DEFAULT_CHUNK,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if chunk_bytes < page_size or chunk_bytes % page_size:
            raise ValueError(f"digest chunk {chunk_bytes} must be a multiple of the page "
                             f"size {page_size}")
        if len(regions) != len(views):
            raise ValueError(f"{len(regions)} regions but {len(views)} views")
        self.page_size = page_size
        self.chunk = chunk_bytes
        self.regions = tuple(regions)
        self._views = [memoryview(v).cast("B") if memoryview(v).format != "B" else
                       memoryview(v) for v in views]
        self._first = np.array([r.gpa // page_size for r in regions], dtype=np.int64)
        self._end = np.array([(r.gpa + r.size) // page_size for r in regions], dtype=np.int64)
        self._crcs = [_initial_crcs(r.size, chunk_bytes) for r in regions]
        self._touched = [np.zeros(len(c), dtype=bool) for c in self._crcs]
        self._clock = clock
        self.hash_seconds = 0.0       # time spent hashing, in total
        self.hashed_bytes = 0
        self.last_rehash_s = 0.0
        self.last_rehash_chunks = 0

    def touch(self, first: np.ndarray | Sequence[int], count: np.ndarray | Sequence[int]) -> None:
        """Pages [first, first+count) changed (sent or received): re-hash their chunks."""
        f = np.asarray(first, dtype=np.int64)
        n = np.asarray(count, dtype=np.int64)
        if f.size == 0:
            return
        ppc = self.chunk // self.page_size
        for i in range(len(self.regions)):
            lo = np.maximum(f, self._first[i])
            hi = np.minimum(f + n, self._end[i])
            sel = hi > lo
            if not sel.any():
                continue
            c0 = (lo[sel] - self._first[i]) // ppc
            c1 = (hi[sel] - 1 - self._first[i]) // ppc + 1
            mark = np.zeros(len(self._touched[i]) + 1, dtype=np.int64)
            np.add.at(mark, c0, 1)
            np.add.at(mark, c1, -1)
            self._touched[i] |= np.cumsum(mark[:-1]) > 0

    @property
    def pending_chunks(self) -> int:
        return int(sum(int(t.sum()) for t in self._touched))

    def rehash(self) -> int:
        """Hash every touched chunk now; returns how many."""
        t0 = self._clock()
        done = 0
        for view, crcs, touched in zip(self._views, self._crcs, self._touched, strict=True):
            idx = np.flatnonzero(touched)
            cb = self.chunk
            for c in idx.tolist():
                piece = view[c * cb:(c + 1) * cb]
                crcs[c] = crc32c(piece)
                self.hashed_bytes += len(piece)
            touched[:] = False
            done += len(idx)
        self.last_rehash_s = self._clock() - t0
        self.last_rehash_chunks = done
        self.hash_seconds += self.last_rehash_s
        return done

    def roots(self) -> list[RegionDigest]:
        """Each region's digest (call ``rehash`` first for a current answer)."""
        return [RegionDigest(r.name, len(c), _root(c))
                for r, c in zip(self.regions, self._crcs, strict=True)]


def compare_roots(source: Sequence[RegionDigest], dest: Sequence[RegionDigest]) -> list[str]:
    """Every region whose digest differs, as sentences (empty: equal)."""
    out = []
    mine = {d.name: d for d in dest}
    if len(source) != len(dest):
        out.append(f"the source digests {len(source)} RAM regions, the destination "
                   f"{len(dest)}")
    for s in source:
        d = mine.get(s.name)
        if d is None:
            out.append(f"RAM region {s.name}: no destination digest")
        elif (s.chunks, s.digest) != (d.chunks, d.digest):
            out.append(f"RAM region {s.name}: source content digest {s.digest} over "
                       f"{s.chunks} chunks, destination {d.digest} over {d.chunks}")
    return out


def full_ram_digest(kernel: KernelOps, blocks: Sequence[tuple[str, int, int]],
                    chunk_bytes: int = DEFAULT_CHUNK) -> list[RegionDigest]:
    """Digest whole regions given as (name, fd, size), read with ``pread`` (holes of a
    sparse file read as zeros without being allocated). Same value as ``RamDigests``."""
    out = []
    piece = max(chunk_bytes, READ_PIECE // chunk_bytes * chunk_bytes)
    for name, fd, size in blocks:
        crcs = _initial_crcs(size, chunk_bytes)
        for off in range(0, size, piece):
            data = kernel.pread(fd, min(piece, size - off), off)
            arr = np.frombuffer(data, dtype=np.uint8)
            full = len(arr) // chunk_bytes
            nz = np.flatnonzero(arr[:full * chunk_bytes].reshape(full, chunk_bytes).any(axis=1)
                                ) if full else np.zeros(0, dtype=np.int64)
            base = off // chunk_bytes
            for c in nz.tolist():
                crcs[base + c] = crc32c(data[c * chunk_bytes:(c + 1) * chunk_bytes])
            if len(arr) > full * chunk_bytes:            # the region's short last chunk
                crcs[base + full] = crc32c(data[full * chunk_bytes:])
        out.append(RegionDigest(name, len(crcs), _root(crcs)))
    return out


def nonzero_page_runs(kernel: KernelOps, fd: int, file_offset: int, first_page: int,
                      count: int, page_size: int) -> list[tuple[int, int]]:
    """The runs of pages of [first_page, first_page+count) (at ``file_offset`` in ``fd``)
    that hold any non-zero byte, read with ``pread`` so holes stay unallocated."""
    out: list[tuple[int, int]] = []
    per = max(1, READ_PIECE // page_size)
    page = 0
    while page < count:
        n = min(per, count - page)
        data = kernel.pread(fd, n * page_size, file_offset + page * page_size)
        if len(data) != n * page_size:
            raise ValueError(f"guest RAM file ended {len(data)} bytes into a "
                             f"{n * page_size}-byte read at {file_offset + page * page_size:#x}")
        nz = np.frombuffer(data, dtype=np.uint64).reshape(n, page_size // 8).any(axis=1)
        if nz.any():
            edges = np.flatnonzero(np.diff(np.concatenate(([0], nz.view(np.int8), [0]))))
            for s, e in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
                start = first_page + page + s
                if out and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], out[-1][1] + e - s)
                else:
                    out.append((start, e - s))
        page += n
    return out
