"""The journal's CRC-32C without numba (``vfiod/daemon/journal_crc.py``) gives the stream's
values: the journal's lines stay readable by either, and a daemon that never migrates
never makes a first numba call (docs/benchmarks.md §2, ``rss_per_guest``)."""

from __future__ import annotations

import random

from vfiod.daemon.journal_crc import journal_crc32c
from vfiod.migration.stream.crc32c import crc32c, crc32c_reference


def test_the_standard_check_value() -> None:
    assert journal_crc32c(b"123456789") == 0xE3069283
    assert journal_crc32c(b"") == 0


def test_the_same_values_as_the_stream_checksum() -> None:
    rng = random.Random(15)
    for n in (1, 7, 8, 9, 63, 64, 300, 1021):
        data = rng.randbytes(n)
        assert journal_crc32c(data) == crc32c(data) == crc32c_reference(data), n
