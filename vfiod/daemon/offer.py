"""The offer: which guest an incoming migration is for, agreed before the session starts
(docs/architecture.md §1 step 5, §5 transport).

A destination daemon may wait for several guests on one listening port, but the
destination session needs its guest before it speaks (it opens with this guest's facts).
So the source daemon opens each connection with one small frame, and the destination
answers on the return path before either session starts::

    source → destination   b"VFOFFER1" | u32 length (LE) | UTF-8 JSON
                           {"guest": "g1", "migration_id": "...", "source_host": "..."}
    destination → source   ACK stage "offer"                  (the session follows)
                           or ERROR code "offer" with the reason, then close

A malformed offer (bad magic, length over ``MAX_OFFER``, not a JSON object, no guest
name) is answered with ERROR too, naming what was wrong.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from typing import Any

from vfiod.migration.transport.control import AckStage, ControlMessage
from vfiod.migration.transport.tcp import Connection

MAGIC = b"VFOFFER1"
_HEAD = struct.Struct("<8sI")
MAX_OFFER = 4096


class OfferError(Exception):
    """The offer could not be read or was refused; the message says why."""


@dataclass(frozen=True)
class Offer:
    guest: str
    migration_id: str = ""
    source_host: str = ""

    def encode(self) -> bytes:
        payload = json.dumps({"guest": self.guest, "migration_id": self.migration_id,
                              "source_host": self.source_host}).encode()
        return _HEAD.pack(MAGIC, len(payload)) + payload


def send_offer(conn: Connection, offer: Offer, timeout: float) -> None:
    """Source side: offer the guest and wait for the destination's acceptance
    (``TransportError`` carrying the destination's reason if refused)."""
    conn.send_buffers([offer.encode()])
    conn.wait_ack(AckStage.OFFER, timeout)


def _read_exact(conn: Connection, n: int, deadline: float) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if time.monotonic() > deadline:
            raise OfferError(f"the source sent {got} of {n} offer bytes before the deadline")
        k = conn.recv_into(view[got:])
        if k == 0:
            raise OfferError(f"the source closed after {got} of {n} offer bytes")
        got += k
    return bytes(buf)


def read_offer(conn: Connection, timeout: float) -> Offer:
    """Destination side: read the offer (``OfferError`` if it is not one)."""
    deadline = time.monotonic() + timeout
    magic, length = _HEAD.unpack(_read_exact(conn, _HEAD.size, deadline))
    if magic != MAGIC:
        raise OfferError(f"not a vfiod migration offer (magic {magic!r}, want {MAGIC!r})")
    if length > MAX_OFFER:
        raise OfferError(f"offer of {length} bytes is over the {MAX_OFFER}-byte limit")
    try:
        doc: Any = json.loads(_read_exact(conn, length, deadline).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OfferError(f"offer is not UTF-8 JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("guest"), str) or not doc["guest"]:
        raise OfferError("offer has no guest name")
    return Offer(doc["guest"], str(doc.get("migration_id", "")),
                 str(doc.get("source_host", "")))


def accept_offer(conn: Connection) -> None:
    conn.send_control(ControlMessage.ack(AckStage.OFFER))


def refuse_offer(conn: Connection, reason: str) -> None:
    conn.send_control(ControlMessage.error("offer", reason))
