"""CRC-32C of a journal line without numba (docs/architecture.md §1.8; the line format is
``vfiod.daemon.journal_records``).

The journal checksums every line with CRC-32C, the stream's checksum. The stream's
implementation (``vfiod.migration.stream.crc32c``) is a numba kernel, and the first call
of any numba kernel in a process builds numba's typing and lowering registries: about
15 MiB of resident memory and 50,000 objects (docs/benchmarks.md §2, ``rss_per_guest``). A
daemon writes its journal at start-up, so that first call used to happen in every daemon,
also in one that never migrates. Journal lines are a few hundred bytes, written at
lifecycle steps and read once at start (the journal is compacted), so a byte-at-a-time
table in plain Python (about 0.1 µs a byte) costs nothing that matters, and numba loads
only when a migration first needs a kernel. The values are the same CRC-32C (the unit
tests compare both implementations).
"""

from __future__ import annotations

#: The reflected Castagnoli polynomial, as in ``vfiod.migration.stream.crc32c``.
_POLY = 0x82F63B78
_MASK32 = 0xFFFFFFFF


def _byte_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        reg = i
        for _ in range(8):
            reg = (reg >> 1) ^ _POLY if reg & 1 else reg >> 1
        table.append(reg)
    return tuple(table)


_TABLE = _byte_table()


def journal_crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (the same value as ``vfiod.migration.stream.crc32c.crc32c``)."""
    reg = _MASK32
    table = _TABLE
    for byte in data:
        reg = table[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return reg ^ _MASK32
