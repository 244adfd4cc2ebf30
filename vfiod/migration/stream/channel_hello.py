"""The CHANNEL record that opens a RAM channel connection (docs/protocol.md §12.2).

A channel connection starts like a stream, with the preamble, and its first record (seq
0) is CHANNEL: UTF-8 JSON naming the migration, answering the destination's challenge of
the main connection, and saying which channel this is::

    {"migration_id": "3f2a...", "challenge": "<32 hex>", "channel": 1, "channels": 4}

``ChannelHello.from_json`` checks the fields; the destination then compares the id and
the challenge with its main connection's (``vfiod/migration/session/channels.py``), so
that a stranger, or a connection recorded from another migration, cannot join.
``read_channel_hello`` reads the preamble and that record from a connection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vfiod.migration.stream.crc32c import crc32c
from vfiod.migration.stream.header import MAX_CHANNELS
from vfiod.migration.stream.reader import Source
from vfiod.migration.stream.records import (
    DEFAULT_LIMITS,
    PREAMBLE_SIZE,
    RECORD_HEADER_SIZE,
    ErrorCode,
    Limits,
    RecordError,
    RecordType,
    check_preamble,
    pack_header,
    pack_preamble,
    unpack_header,
)


@dataclass(frozen=True)
class ChannelHello:
    migration_id: str
    challenge: str
    channel: int        # 1..channels
    channels: int

    def to_json(self) -> bytes:
        return json.dumps({"migration_id": self.migration_id, "challenge": self.challenge,
                           "channel": self.channel, "channels": self.channels},
                          sort_keys=True, separators=(",", ":")).encode()

    def opening(self) -> list[bytes]:
        """The preamble and the CHANNEL record (seq 0): what a channel sends first."""
        payload = self.to_json()
        return [pack_preamble(), pack_header(RecordType.CHANNEL, 0, len(payload), 0, 0,
                                             crc32c(payload)), payload]

    @classmethod
    def from_json(cls, payload: bytes | bytearray | memoryview) -> ChannelHello:
        """Parse; ``ValueError`` naming the field that is wrong."""
        try:
            doc: Any = json.loads(bytes(payload).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"CHANNEL is not UTF-8 JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError("CHANNEL must be a JSON object")
        for key in ("migration_id", "challenge"):
            if not isinstance(doc.get(key), str):
                raise ValueError(f"CHANNEL.{key} must be a string")
        n, i = doc.get("channels"), doc.get("channel")
        if not (isinstance(n, int) and not isinstance(n, bool) and 2 <= n <= MAX_CHANNELS):
            raise ValueError(f"CHANNEL.channels {n!r} is not between 2 and {MAX_CHANNELS}")
        if not (isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= n):
            raise ValueError(f"CHANNEL.channel {i!r} is not between 1 and {n}")
        return cls(doc["migration_id"], doc["challenge"], i, n)


def _fill(src: Source, view: memoryview, what: str, at: int) -> None:
    got = 0
    while got < len(view):
        k = src.recv_into(view[got:])
        if k == 0:
            raise RecordError(ErrorCode.TRUNCATED, f"the channel ended {got} bytes into "
                              f"{what}", record=None if at == 0 else 0, offset=at)
        got += k


def read_channel_hello(src: Source, limits: Limits = DEFAULT_LIMITS) -> ChannelHello:
    """The preamble and CHANNEL record of a channel connection, checked; ``RecordError``
    (wrong magic, version, checksum, a first record that is not CHANNEL, bad JSON)."""
    pre = memoryview(bytearray(PREAMBLE_SIZE))
    _fill(src, pre, "the preamble", 0)
    check_preamble(pre)
    head = memoryview(bytearray(RECORD_HEADER_SIZE))
    _fill(src, head, "the CHANNEL record header", PREAMBLE_SIZE)
    h = unpack_header(head, seq=0, offset=PREAMBLE_SIZE, limits=limits)
    if h.rtype != RecordType.CHANNEL:
        raise RecordError(ErrorCode.ORDER, "the first record of a channel must be CHANNEL",
                          record=0, offset=PREAMBLE_SIZE, rtype=h.rtype)
    payload = memoryview(bytearray(h.length))   # bounded: 4 KiB for CHANNEL
    _fill(src, payload, "the CHANNEL payload", PREAMBLE_SIZE)
    if crc32c(payload) != h.payload_crc:
        raise RecordError(ErrorCode.PAYLOAD_CHECKSUM, "CHANNEL payload checksum mismatch",
                          record=0, offset=PREAMBLE_SIZE, rtype=h.rtype)
    try:
        return ChannelHello.from_json(payload)
    except ValueError as e:
        raise RecordError(ErrorCode.CONTENT, str(e), record=0, offset=PREAMBLE_SIZE,
                          rtype=h.rtype) from None
