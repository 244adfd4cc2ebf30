"""Whole guest RAM read from its files, out of the downtime window: the full audit's
digest (``full_ram_digest``, the same value as ``digest.RamDigests``), the scan for pages
holding data (``nonzero_page_runs``: a source's first pass skips zero pages) and the
zeroing of a discarded receive (``zero_ram``), each through one reused ``PieceBuffer``
(docs/architecture.md §1 step 5, §5 manifest).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vfiod.kernel.ops import KernelOps
from vfiod.migration.guest.memory import RamBlock
from vfiod.migration.session.digest import RegionDigest
from vfiod.migration.session.digest_root import region_root
from vfiod.migration.stream.pagecrc import page_crcs

#: bytes read per pread when hashing a whole region (the full audit, the zero scan)
READ_PIECE = 8 << 20


class PieceBuffer:
    """Anonymous memory that guest RAM is ``pread`` into, one piece at a time (the full
    audit, the zero scan), reused for every piece and given back to the kernel on
    ``close()``. Reading into a fresh ``bytes`` per piece left memory behind: glibc serves
    a freed multi-MiB block's successors from the malloc arena of the thread that asked,
    keeps them there when freed, and a migration's threads are handed arenas in turn, so
    each migration left a few MiB resident in another arena (README "Limits")."""

    def __init__(self, kernel: KernelOps, size: int = READ_PIECE) -> None:
        self.kernel = kernel
        self.size = size
        self._memory = kernel.anonymous_memory(size)
        self._view = memoryview(self._memory)

    def read(self, fd: int, length: int, offset: int, what: str) -> memoryview:
        """Exactly ``length`` bytes (at most ``size``) of ``fd`` at ``offset``, valid until
        the next read; ``ValueError`` naming ``what`` if the file ends first."""
        if length > self.size:
            raise ValueError(f"{what}: a {length}-byte read into a {self.size}-byte buffer")
        piece = self._view[:length]
        got = self.kernel.pread_into(fd, piece, offset)
        if got != length:
            raise ValueError(f"{what} ended {got} bytes into a {length}-byte read at "
                             f"{offset:#x}")
        return piece

    def close(self) -> None:
        self._view.release()
        try:
            self._memory.close()
        except BufferError:
            # a piece is still referenced (by the frames of an error's traceback): the
            # mapping goes when the last piece does, and the error is the one to report
            pass

    def __enter__(self) -> PieceBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def full_ram_digest(kernel: KernelOps, blocks: Sequence[RamBlock],
                    page_size: int = 4096) -> list[RegionDigest]:
    """Digest whole regions, each read from its file with ``pread`` (holes of a sparse
    file read as zeros without being allocated). Same value as ``RamDigests``."""
    out = []
    piece = max(page_size, READ_PIECE // page_size * page_size)
    with PieceBuffer(kernel, piece) as buf:
        for b in blocks:
            crcs = np.empty(b.size // page_size, dtype=np.uint32)
            for off in range(0, b.size, piece):
                n = min(piece, b.size - off)
                page_crcs(buf.read(b.fd, n, b.offset + off, f"RAM region {b.name}: file"),
                          page_size,
                          out=crcs[off // page_size:(off + n) // page_size])
            out.append(RegionDigest(b.name, len(crcs), region_root(crcs)))
    return out


def zero_ram(kernel: KernelOps, blocks: Sequence[RamBlock], page_size: int = 4096) -> int:
    """Write zeros over every page holding data in the regions: found with ``pread`` (holes
    stay holes), so it covers pages a record wrote before failing its check or being cut
    off. Returns the pages zeroed. Zeros are written in place: a ``bytes`` of the run's
    size would be one more large transient allocation (``PieceBuffer``)."""
    done = 0
    with PieceBuffer(kernel, max(page_size, READ_PIECE // page_size * page_size)) as buf:
        for b in blocks:
            first = b.gpa // page_size
            with b.view() as view:
                for page, n in nonzero_page_runs(kernel, b.fd, b.offset, first,
                                                 b.size // page_size, page_size, buf):
                    np.frombuffer(view, np.uint8, n * page_size,
                                  (page - first) * page_size)[:] = 0
                    done += n
    return done


def nonzero_page_runs(kernel: KernelOps, fd: int, file_offset: int, first_page: int,
                      count: int, page_size: int,
                      buf: PieceBuffer | None = None) -> list[tuple[int, int]]:
    """The runs of pages of [first_page, first_page+count) (at ``file_offset`` in ``fd``)
    that hold any non-zero byte, read with ``pread`` so holes stay unallocated, into
    ``buf`` (a caller scanning many runs passes one; else one lives for this call)."""
    if buf is None:
        with PieceBuffer(kernel, max(page_size, min(count * page_size, READ_PIECE))) as own:
            return nonzero_page_runs(kernel, fd, file_offset, first_page, count, page_size,
                                     own)
    out: list[tuple[int, int]] = []
    per = max(1, buf.size // page_size)
    page = 0
    while page < count:
        n = min(per, count - page)
        # one bool per page: any non-zero byte (the piece is not kept past this line)
        nz = np.frombuffer(buf.read(fd, n * page_size, file_offset + page * page_size,
                                    "guest RAM file"), dtype=np.uint64
                           ).reshape(n, page_size // 8).any(axis=1)
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

