"""Per-page CRC-32C of a run of guest pages: the checksum of every RAM record.

A RAM record carries one CRC-32C per page (``records.py``) rather than one over the whole
payload, for two reasons:

* a record sent from live guest memory may fail its check because the guest wrote a page
  during the send; with one CRC per page the destination knows exactly which pages must
  arrive again (``torn.py``), and those are exactly the pages dirty tracking re-sends;
* a CRC-32 over 4 KiB detects more error patterns than one over megabytes.

Speed: a 4 KiB page is only 512 words, too short for the three-lane split of
``crc32c._crc_sse42``, so this kernel runs three *pages* side by side instead (three
independent dependency chains), which keeps the CRC instruction's pipeline full. The three
pages are a third of the buffer apart (pages ``j``, ``j + n/3``, ``j + 2n/3``), not
neighbours: over guest memory that is not in the cache (the source's first read of a
record) that reads at 21 GB/s against 12 GB/s for three adjacent pages on the project's
machine, the same in the cache (docs/benchmarks.md §6).

``page_crcs(data, page_size, out=None)`` returns a ``uint32`` array, entry ``i`` being the
standard CRC-32C (``crc32c.crc32c``) of page ``i`` of ``data``; ``page_crcs_at(data,
pages, page_size)`` the same for the pages at the indexes ``pages`` (the writer's batches
of short runs: one call instead of one per run). They are two kernels, not one over an
index list: ``page_crcs`` through the index list read 13.7 GB/s against 26.8 for the
direct loop, over 4 MiB records on the project's machine.

``PageCrcSink`` is where the stream hands the CRCs it computed of pages that cannot change
afterwards (docs/protocol.md §7.3): the destination's pages as they landed, the source's
pages sent while the guest is stopped. The session's content digests take them instead of
reading those pages a second time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from numba import njit

from vfiod.migration.stream.crc32c import (
    _M32,
    _TABLES,
    _U8,
    _U24,
    _U32,
    IMPLEMENTATION,
    _as_bytes,
    _crc32_u64,
)

_FF = np.uint64(0xFF)
_U16 = np.uint64(16)


@njit(nogil=True, cache=True)
def _pages_sse42(buf, page_size, out):
    words = np.frombuffer(buf, np.uint8).view(np.uint64)
    wpp = page_size // 8
    n = out.shape[0]
    third = n // 3
    for j in range(third):
        a = _M32
        b = _M32
        c = _M32
        p0 = j * wpp
        p1 = p0 + third * wpp
        p2 = p1 + third * wpp
        for k in range(wpp):
            a = _crc32_u64(a, words[p0 + k])  # type: ignore[call-arg]
            b = _crc32_u64(b, words[p1 + k])
            c = _crc32_u64(c, words[p2 + k])
        out[j] = a ^ _M32
        out[j + third] = b ^ _M32
        out[j + 2 * third] = c ^ _M32
    for i in range(3 * third, n):
        a = _M32
        p0 = i * wpp
        for k in range(wpp):
            a = _crc32_u64(a, words[p0 + k])  # type: ignore[call-arg]
        out[i] = a ^ _M32


@njit(nogil=True, cache=True)
def _pages_table(buf, page_size, out, t):
    words = np.frombuffer(buf, np.uint8).view(np.uint64)  # little-endian loads
    wpp = page_size // 8
    for i in range(out.shape[0]):
        reg = _M32
        for k in range(i * wpp, (i + 1) * wpp):
            w = words[k]
            lo = (reg ^ w) & _M32
            hi = w >> _U32
            reg = (t[7, lo & _FF] ^ t[6, (lo >> _U8) & _FF] ^ t[5, (lo >> _U16) & _FF]
                   ^ t[4, lo >> _U24] ^ t[3, hi & _FF] ^ t[2, (hi >> _U8) & _FF]
                   ^ t[1, (hi >> _U16) & _FF] ^ t[0, hi >> _U24])
        out[i] = reg ^ _M32


@njit(nogil=True, cache=True)
def _pages_at_sse42(buf, pages, page_size, out):
    words = np.frombuffer(buf, np.uint8).view(np.uint64)
    wpp = page_size // 8
    n = out.shape[0]
    third = n // 3
    for j in range(third):
        a = _M32
        b = _M32
        c = _M32
        p0 = pages[j] * wpp
        p1 = pages[j + third] * wpp
        p2 = pages[j + 2 * third] * wpp
        for k in range(wpp):
            a = _crc32_u64(a, words[p0 + k])  # type: ignore[call-arg]
            b = _crc32_u64(b, words[p1 + k])
            c = _crc32_u64(c, words[p2 + k])
        out[j] = a ^ _M32
        out[j + third] = b ^ _M32
        out[j + 2 * third] = c ^ _M32
    for i in range(3 * third, n):
        a = _M32
        p0 = pages[i] * wpp
        for k in range(wpp):
            a = _crc32_u64(a, words[p0 + k])  # type: ignore[call-arg]
        out[i] = a ^ _M32


@njit(nogil=True, cache=True)
def _pages_at_table(buf, pages, page_size, out, t):
    words = np.frombuffer(buf, np.uint8).view(np.uint64)
    wpp = page_size // 8
    for i in range(out.shape[0]):
        reg = _M32
        for k in range(pages[i] * wpp, (pages[i] + 1) * wpp):
            w = words[k]
            lo = (reg ^ w) & _M32
            hi = w >> _U32
            reg = (t[7, lo & _FF] ^ t[6, (lo >> _U8) & _FF] ^ t[5, (lo >> _U16) & _FF]
                   ^ t[4, lo >> _U24] ^ t[3, hi & _FF] ^ t[2, (hi >> _U8) & _FF]
                   ^ t[1, (hi >> _U16) & _FF] ^ t[0, hi >> _U24])
        out[i] = reg ^ _M32


def page_crcs_at(data: object, pages: np.ndarray, page_size: int,
                 implementation: str = IMPLEMENTATION) -> np.ndarray:
    """CRC-32C of the pages of ``data`` at the indexes ``pages`` (int64), in that order:
    many short runs of one region in one call (the writer's scattered batches; a call
    per run cost more than its CRCs)."""
    buf = _as_bytes(data)
    nbytes = memoryview(buf).nbytes  # type: ignore[arg-type]
    if page_size <= 0 or page_size % 8 or nbytes % page_size:
        raise ValueError(f"{nbytes} bytes are not whole pages of {page_size} bytes")
    if pages.size and (int(pages.min()) < 0 or int(pages.max()) >= nbytes // page_size):
        raise ValueError(f"page indexes outside the {nbytes // page_size} pages given")
    out = np.empty(pages.size, dtype=np.uint32)
    if pages.size:
        if implementation == "sse4.2":
            _pages_at_sse42(buf, pages, page_size, out)
        else:
            _pages_at_table(buf, pages, page_size, out, _TABLES)
    return out


def page_crcs(data: object, page_size: int, out: np.ndarray | None = None,
              implementation: str = IMPLEMENTATION) -> np.ndarray:
    """CRC-32C of each ``page_size`` page of ``data`` (whose length is a multiple of it)."""
    buf = _as_bytes(data)
    nbytes = memoryview(buf).nbytes  # type: ignore[arg-type]
    if page_size <= 0 or page_size % 8 or nbytes % page_size:
        raise ValueError(f"{nbytes} bytes are not whole pages of {page_size} bytes")
    n = nbytes // page_size
    if out is None:
        out = np.empty(n, dtype=np.uint32)
    elif out.shape != (n,) or out.dtype != np.uint32:
        raise ValueError(f"out must be a uint32 array of {n} entries")
    if n:
        if implementation == "sse4.2":
            _pages_sse42(buf, page_size, out)
        else:
            _pages_table(buf, page_size, out, _TABLES)
    return out


class PageCrcSink(Protocol):
    """Takes per-page CRCs the stream computed (``session/digest.py`` ``RamDigests``)."""

    def take_page_crcs(self, first_page: int, crcs: np.ndarray) -> None:
        """``crcs[i]`` is the CRC-32C of guest page ``first_page + i`` as it is in memory
        now, and nothing changes that page until the stream hands a newer CRC of it (a
        page landing again in a later pass). Called on the thread that computed them
        (a RAM channel's); ``crcs`` may be reused by the caller once this returns."""
        ...

    def take_runs_crcs(self, firsts: Sequence[int], counts: Sequence[int],
                       crcs: np.ndarray) -> None:
        """``take_page_crcs`` for many runs at once (a send batch, a RAM_RUNS record):
        ``crcs`` holds the CRCs of run 0's pages, then run 1's, and so on."""
        ...
