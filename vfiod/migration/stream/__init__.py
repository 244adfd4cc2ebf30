"""The migration stream: versioned, framed, checksummed records (docs/architecture.md §5).

Modules:

* ``records``  wire format (preamble, 40-byte record header, types, ``Limits``,
  ``RecordError`` with record index, byte offset and ``ErrorCode``)
* ``header``   the HEADER payload: source, guest layout (``vfiod.vfio.RamRegion``), ``DeviceInfo``
* ``manifest`` per-region / per-device tallies and the final MANIFEST check
* ``ram``      ``GuestRam``: guest pages → slices of the mmaps backing them
* ``writer``   ``StreamWriter`` (source) over any ``StreamSink``
* ``reader``   ``StreamReader`` (destination) over any ``Source``, yielding events
* ``events``   the events it yields (``RamLoaded``, ``RamRunsLoaded``, ``DeviceData``, ``Complete``, ...)
* ``crc32c``   the record checksum (SSE4.2 via numba, table fallback)
* ``pagecrc``  one CRC-32C per guest page: the checksum of RAM records
* ``torn``     pages of live (pre-copy) records that failed their check until re-sent
* ``channel_hello`` the CHANNEL record that opens a RAM channel (docs/protocol.md §12;
  the channels' senders and receivers are in ``vfiod.migration.transport``)

Speed, measured on the project's 2-core machine with other jobs running (so noisy): the
checks cost about 0.1 CPU-second per GiB on each end (CRC-32C runs at 11-17 GB/s per core;
a loopback TCP copy costs each end about 0.2 CPU-second per GiB). See
``tests/bench/bench_stream.py`` for the same-run comparison with a raw socket.

Transports (TCP, TLS, files) live in ``vfiod.migration.transport`` and implement ``StreamSink``
and ``Source``; this package never touches a socket or a file itself.
"""

from vfiod.migration.stream.events import (
    Complete,
    DeviceData,
    EndOfState,
    Event,
    IterationMark,
    RamLoaded,
    RamRunsLoaded,
)
from vfiod.migration.stream.header import DeviceInfo, StreamHeader
from vfiod.migration.stream.manifest import Manifest, ManifestEntry
from vfiod.migration.stream.ram import GuestRam
from vfiod.migration.stream.reader import Source, StreamReader
from vfiod.migration.stream.records import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    ErrorCode,
    Limits,
    RecordError,
    RecordType,
)
from vfiod.migration.stream.writer import StreamSink, StreamWriter

__all__ = [
    "DEFAULT_LIMITS", "PROTOCOL_VERSION", "Complete", "DeviceData", "DeviceInfo",
    "EndOfState", "ErrorCode", "Event", "GuestRam", "IterationMark", "Limits", "Manifest",
    "ManifestEntry", "RamLoaded", "RamRunsLoaded", "RecordError", "RecordType", "StreamSink", "Source",
    "StreamHeader", "StreamReader", "StreamWriter",
]
