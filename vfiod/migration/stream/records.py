"""Wire format of the migration stream: preamble, record header, record types, limits.

docs/architecture.md §5. Everything is little-endian. A stream is a 16-byte preamble followed by
records; byte offsets in errors count from the first byte of the preamble.

Preamble (16 bytes)::

    0   8s  magic  b"VFIODMS\\0"
    8   u16 version (PROTOCOL_VERSION)
    10  u16 flags   (0; anything else is refused)
    12  u32 crc32c of bytes 0..11

Record header (40 bytes), then ``length`` payload bytes::

    0   u16 type          RecordType
    2   u16 flags         RAM: RAM_LIVE or 0; other types 0 (anything else is refused)
    4   u32 seq           record index: HEADER is 0, each record is previous + 1
    8   u64 length        payload bytes (bounded per type by ``Limits``)
    16  u64 arg0          RAM: first guest page; DEVICE_*: device index; ITERATION: number
    24  u64 arg1          RAM: page count; DEVICE_DATA: chunk index within the device
    32  u32 payload_crc   crc32c of the payload (0 for an empty payload); RAM: of its table
    36  u32 header_crc    crc32c of header bytes 0..35

A RAM record's payload is ``count`` little-endian u32 CRC-32Cs, one per page (the table,
covered by ``payload_crc``), then the ``count`` pages themselves, each covered by its table
entry (``pagecrc.py`` says why per page). A RAM_RUNS record carries ``arg0`` runs of pages
(``arg1`` pages in all) of one region: its payload starts with the run table (``arg0``
``RUN_ENTRY``: first page, count; ascending, disjoint), then the CRC table, then the pages
in run order; ``payload_crc`` covers both tables (``ram_landing.py``).

``RAM_LIVE`` marks a RAM record sent while the guest ran (pre-copy, zero copy from the guest
mapping): if its checksum fails, the guest wrote those pages during the send; they are dirty
again and must arrive verified in a later record before RAM is complete (``torn.py``).
Without the flag (stop-and-copy) a checksum failure is fatal at once.

Why the RAM page range lives in the header and not in the payload: the payload of a RAM
record is then nothing but page bytes, so a receiver can ``recv_into`` the destination's
guest memory directly, after checking the range against the layout from the (checked)
header. Why ``seq``: a lost, duplicated or reordered record is caught at once with its index.

Record order (enforced by the reader): HEADER first and once; then RAM, DEVICE_DATA and
ITERATION in any interleaving; DEVICE_DATA of one device in chunk order and never after that
device's END_OF_STATE; once any END_OF_STATE is seen (the devices' stop-copy tail: RAM is
complete by then), no more RAM or ITERATION, only DEVICE_DATA and END_OF_STATE of devices
that have not ended; MANIFEST last, after every device has ended. ABORT may come at any
point after the preamble: the source cancelled and the destination discards everything.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from vfiod.errors import StreamError
from vfiod.migration.stream.crc32c import crc32c

#: The migration protocol: this stream and its return-path frames (``transport.control``).
#: 2: the source's final content digests travel in their own DIGESTS frame (1: in an ACK).
#: 3: the source sends its downtime, prediction and error after ACK resumed (REPORT).
#: 4: the confirmed switchover: ACK prepared, COMMIT, outcome queries, and the
#:    destination's challenge, which the HEADER must answer (docs/protocol.md §8.4).
#: RAM_RUNS records (docs/protocol.md §5.4) need no new version: a source sends them only
#: to a destination that offered them in its HELLO, and says so in its HEADER.
PROTOCOL_VERSION = 4
MAGIC = b"VFIODMS\x00"

PREAMBLE = struct.Struct("<8sHHI")
PREAMBLE_SIZE = PREAMBLE.size  # 16
RECORD_HEADER = struct.Struct("<HHIQQQII")
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 40
#: The bytes the header checksum covers (everything before ``header_crc``).
HEADER_CRC_SPAN = RECORD_HEADER_SIZE - 4

KiB = 1024
MiB = 1024 * KiB
MIN_PAGE_SIZE = 4096


#: RAM record flag: sent from live guest memory (see the module docstring).
RAM_LIVE = 0x1
#: one entry of a RAM_RUNS record's run table: first guest page, page count
RUN_ENTRY = struct.Struct("<QQ")


class RecordType(enum.IntEnum):
    HEADER = 1        # JSON StreamHeader: protocol, source, guest layout, devices
    RAM = 2           # guest pages [arg0, arg0 + arg1), payload = the page bytes
    DEVICE_DATA = 3   # opaque device state, in order, per device (arg0), chunk arg1
    END_OF_STATE = 4  # device arg0 has sent all of its state
    ITERATION = 5     # a pre-copy pass ended (arg0 = its number, increasing)
    MANIFEST = 6      # JSON per-region and per-device tallies: the destination verifies
    ABORT = 7         # UTF-8 reason: the source cancelled, discard everything
    CHANNEL = 8       # JSON: opens a RAM channel connection (docs/protocol.md §12)
    SYNC = 9          # a channel's part of pass arg0 is complete; arg1 records before it
    RAM_RUNS = 10     # arg0 runs, arg1 pages in all; when the HEADER offers them (§5.4)


#: the record types that carry guest pages (and may carry ``RAM_LIVE``)
RAM_TYPES = frozenset((RecordType.RAM, RecordType.RAM_RUNS))


class ErrorCode(enum.Enum):
    """What went wrong, for callers to branch on (never on the message text)."""

    MAGIC = "magic"                        # not a vfiod stream
    VERSION = "version"                    # a protocol version this build does not speak
    TYPE = "type"                          # unknown record type
    FLAGS = "flags"                        # reserved bits set
    LENGTH = "length"                      # length over the bound, or inconsistent
    HEADER_CHECKSUM = "header-checksum"
    PAYLOAD_CHECKSUM = "payload-checksum"
    SEQUENCE = "sequence"                  # a record is missing, repeated or out of place
    ORDER = "order"                        # a record type where the protocol forbids it
    RANGE = "range"                        # RAM outside the guest layout, unknown device
    CONTENT = "content"                    # a HEADER/MANIFEST payload that does not parse
    TRUNCATED = "truncated"                # the stream ended inside or before a record
    MANIFEST = "manifest"                  # a tally or digest differs: data was lost
    ABORTED = "aborted"                    # the source sent ABORT


class RecordError(StreamError):
    """A stream fault, located: ``record`` index (None before the first record),
    ``offset`` (byte offset of that record's header, or of the fault), ``code``, and for
    a manifest mismatch the ``region`` (RAM region or device name) that differs."""

    def __init__(self, code: ErrorCode, message: str, *, record: int | None, offset: int,
                 rtype: int | None = None, region: str | None = None) -> None:
        self.code = code
        self.record = record
        self.offset = offset
        self.rtype = rtype
        self.region = region
        where = "stream preamble" if record is None else f"record {record}"
        if rtype is not None:
            where += f" ({type_name(rtype)})"
        super().__init__(f"{where} at byte offset {offset}: {message}")


def type_name(rtype: int) -> str:
    try:
        return RecordType(rtype).name
    except ValueError:
        return f"type {rtype}"


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what a reader accepts and a writer emits (bytes).

    A reader never allocates from a length it has not checked against these; RAM payload
    is bounded here and lands in guest memory, never in a fresh buffer.
    """

    header: int = 1 * MiB
    manifest: int = 8 * MiB
    abort: int = 64 * KiB
    device_chunk: int = 16 * MiB
    ram_record: int = 64 * MiB  # page bytes of one RAM record (its CRC table comes on top)
    ram_runs: int = 1024        # runs of one RAM_RUNS record (each a 16-byte table entry)

    def bound(self, rtype: int) -> int:
        return self._bounds[rtype]

    @cached_property
    def _bounds(self) -> dict[int, int]:
        return {
            RecordType.HEADER: self.header,
            RecordType.RAM: self.ram_record + self.ram_record // MIN_PAGE_SIZE * 4,
            RecordType.DEVICE_DATA: self.device_chunk,
            RecordType.END_OF_STATE: 0,
            RecordType.ITERATION: 0,
            RecordType.MANIFEST: self.manifest,
            RecordType.ABORT: self.abort,
            RecordType.CHANNEL: 4 * KiB,
            RecordType.SYNC: 0,
            RecordType.RAM_RUNS: (self.ram_record + self.ram_record // MIN_PAGE_SIZE * 4
                                  + self.ram_runs * RUN_ENTRY.size),
        }


DEFAULT_LIMITS = Limits()


class RecordHeader(NamedTuple):
    rtype: int
    flags: int
    seq: int
    length: int
    arg0: int
    arg1: int
    payload_crc: int
    header_crc: int


def pack_preamble(version: int = PROTOCOL_VERSION) -> bytes:
    head = struct.pack("<8sHH", MAGIC, version, 0)
    return head + struct.pack("<I", crc32c(head))


def check_preamble(buf: bytes | bytearray | memoryview) -> int:
    """Validate the 16 preamble bytes; returns the version (only PROTOCOL_VERSION passes)."""
    magic, version, flags, crc = PREAMBLE.unpack(buf)
    if magic != MAGIC:
        raise RecordError(ErrorCode.MAGIC, f"not a vfiod migration stream (magic {magic!r})",
                          record=None, offset=0)
    if crc32c(bytes(buf[:12])) != crc:
        raise RecordError(ErrorCode.HEADER_CHECKSUM, "preamble checksum mismatch",
                          record=None, offset=0)
    if version != PROTOCOL_VERSION:
        age = "an older" if version < PROTOCOL_VERSION else "a newer"
        raise RecordError(ErrorCode.VERSION, f"stream protocol version {version} ({age} "
                          f"vfiod), this vfiod speaks {PROTOCOL_VERSION} only",
                          record=None, offset=8)
    if flags:
        raise RecordError(ErrorCode.FLAGS, f"preamble flags {flags:#x} are reserved",
                          record=None, offset=10)
    return version


def pack_header(rtype: int, seq: int, length: int, arg0: int = 0, arg1: int = 0,
                payload_crc: int = 0, flags: int = 0) -> bytes:
    """The 40 header bytes of one record, header checksum included."""
    head = _HEAD_NO_CRC.pack(rtype, flags, seq, length, arg0, arg1, payload_crc)
    return head + struct.pack("<I", crc32c(head))


_HEAD_NO_CRC = struct.Struct("<HHIQQQI")


def unpack_header(buf: bytes | bytearray | memoryview, *, seq: int, offset: int,
                  limits: Limits) -> RecordHeader:
    """Parse and check one record header read at ``offset`` where record ``seq`` is due.

    Checks, in this order so that the first fault named is the real one: header checksum
    (any flipped byte stops here), type, reserved flags, sequence, length bound.
    """
    h = RecordHeader._make(RECORD_HEADER.unpack(buf))
    if crc32c(buf[:HEADER_CRC_SPAN]) != h.header_crc:
        raise RecordError(ErrorCode.HEADER_CHECKSUM, "record header checksum mismatch",
                          record=seq, offset=offset)
    bound = limits._bounds.get(h.rtype)
    if bound is None:
        raise RecordError(ErrorCode.TYPE, f"unknown record type {h.rtype}", record=seq,
                          offset=offset)
    if h.flags & ~(RAM_LIVE if h.rtype in RAM_TYPES else 0):
        raise RecordError(ErrorCode.FLAGS, f"reserved flags {h.flags:#x} set", record=seq,
                          offset=offset, rtype=h.rtype)
    if h.seq != seq & 0xFFFFFFFF:
        raise RecordError(ErrorCode.SEQUENCE, f"sequence number {h.seq}, expected "
                          f"{seq & 0xFFFFFFFF} (a record was lost or repeated)",
                          record=seq, offset=offset, rtype=h.rtype)
    if h.length > bound:
        raise RecordError(ErrorCode.LENGTH, f"length {h.length} over the bound {bound}",
                          record=seq, offset=offset, rtype=h.rtype)
    return h
