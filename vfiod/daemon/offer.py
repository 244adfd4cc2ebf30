"""The offer: which guest an incoming migration is for, agreed before the session starts
(docs/architecture.md §1 step 5, §5 transport).

A destination daemon may wait for several guests on one listening port, but the
destination session needs its guest before it speaks (it opens with this guest's facts).
So the source daemon opens each connection with one small frame, and the destination
answers on the return path before either session starts::

    source → destination   b"VFOFFER1" | u32 length (LE) | UTF-8 JSON
                           {"kind": "migrate", "guest": "g1", "migration_id": "...",
                            "source_host": "...", "reply_port": 4444}
    destination → source   ACK stage "offer"                  (the session follows)
                           or ERROR code "offer" with the reason, then close

The same frame with ``"kind": "query"`` (and the asker's ``role`` and ``decision``) asks
about a migration's outcome instead (``outcomes.py``, docs/protocol.md §8.4).

A malformed offer (bad magic, length over ``MAX_OFFER``, not a JSON object, no guest
name) is answered with ERROR too, naming what was wrong.

The migration port is open to any host that can reach it, so the time before an offer is
accepted is bounded (``OfferLimits``, README "Limits"): at most ``max_pending``
connections are in their TLS handshake or offer at once, and a newcomer closes the
oldest of them (a real source sends its offer at once; a flood cannot lock it out for
long); each is closed at its deadline, ``deadline_s`` after it was accepted, whatever it
is blocked in; a TLS handshake also has its own, shorter deadline.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from vfiod.migration.transport.control import (
    AckStage,
    ControlMessage,
    TransportCode,
    TransportError,
)
from vfiod.migration.transport.tcp import Accepted, Connection

log = logging.getLogger("vfiod.migrations")

MAGIC = b"VFOFFER1"
_HEAD = struct.Struct("<8sI")
MAX_OFFER = 4096


class OfferError(Exception):
    """The offer could not be read or was refused; the message says why."""


#: what a connection opened with an offer frame is for
OFFER_KINDS = ("migrate", "query", "channel")


@dataclass(frozen=True)
class Offer:
    guest: str
    migration_id: str = ""
    source_host: str = ""
    kind: str = "migrate"
    #: migrate: the source daemon's own migration port (0: it does not listen), where a
    #: destination left prepared asks it about the outcome
    reply_port: int = 0
    #: query: the asker's role, and "commit" when a committed source asks
    role: str = ""
    decision: str = ""

    def encode(self) -> bytes:
        payload = json.dumps({"kind": self.kind, "guest": self.guest,
                              "migration_id": self.migration_id,
                              "source_host": self.source_host, "reply_port": self.reply_port,
                              "role": self.role, "decision": self.decision}).encode()
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
        left = deadline - time.monotonic()
        late = OfferError(f"the source sent {got} of {n} offer bytes before the deadline")
        if left <= 0:
            raise late
        conn.set_io_timeout(left)           # no single receive outlives the deadline
        try:
            k = conn.recv_into(view[got:])
        except TransportError as e:
            if e.code is TransportCode.TIMEOUT:
                raise late from None
            raise
        if k == 0:
            raise OfferError(f"the source closed after {got} of {n} offer bytes")
        got += k
    return bytes(buf)


def read_offer(conn: Connection, timeout: float) -> Offer:
    """Destination side: read the offer (``OfferError`` if it is not one)."""
    io_timeout = conn.io_timeout
    try:
        return _read_offer(conn, time.monotonic() + timeout)
    finally:
        conn.set_io_timeout(io_timeout)


def _read_offer(conn: Connection, deadline: float) -> Offer:
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
    kind = doc.get("kind", "migrate")
    if kind not in OFFER_KINDS:
        raise OfferError(f"offer kind {kind!r} is not one of {', '.join(OFFER_KINDS)}")
    port = doc.get("reply_port", 0)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
        raise OfferError(f"offer reply_port {port!r} is not a port number")
    mid = str(doc.get("migration_id", ""))
    if kind in ("query", "channel") and not mid:
        raise OfferError(f"an offer of kind {kind} names no migration id")
    return Offer(doc["guest"], mid, str(doc.get("source_host", "")), kind, port,
                 str(doc.get("role", "")), str(doc.get("decision", "")))


def refuse_quietly(conn: Connection, reason: str) -> None:
    """Tell the source why (best effort: it may be gone already)."""
    try:
        refuse_offer(conn, reason)
    except (TransportError, OSError):
        pass


def accept_offer(conn: Connection) -> None:
    conn.send_control(ControlMessage.ack(AckStage.OFFER))


def refuse_offer(conn: Connection, reason: str) -> None:
    conn.send_control(ControlMessage.error("offer", reason))


@dataclass(frozen=True)
class OfferLimits:
    max_pending: int = 16          # connections in their handshake or offer at once
    deadline_s: float = 30.0       # from accept to an offer read (handshake included)
    handshake_s: float = 10.0      # the TLS handshake alone


#: how long a newcomer waits for the thread of the connection it evicted to let go
EVICT_WAIT_S = 1.0


class PendingOffers:
    """The connections accepted whose offer is not read yet: at most ``max_pending``, each
    closed at its deadline (``expire``, called by the accept loop between accepts)."""

    def __init__(self, limits: OfferLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        # insertion order: the first is the oldest
        self._pending: dict[Accepted, float] = {}
        self._slots = threading.BoundedSemaphore(limits.max_pending)

    def admit(self, conn: Accepted) -> bool:
        """Count ``conn`` in, closing the oldest if all slots are taken; False (``conn``
        is closed) if no slot came free within ``EVICT_WAIT_S``. A slot is free once the
        thread of the closed connection has called ``done``, so the threads reading offers
        never outnumber the slots."""
        with self._lock:
            if len(self._pending) >= self.limits.max_pending:
                oldest = next(iter(self._pending))
                del self._pending[oldest]
                log.warning("migration port: %s closed before its offer: %d connections "
                            "were waiting to offer", oldest.peer, self.limits.max_pending)
                oldest.abort()
        if not self._slots.acquire(timeout=EVICT_WAIT_S):
            log.warning("migration port: %s refused: no offer slot came free", conn.peer)
            conn.close()
            return False
        with self._lock:
            self._pending[conn] = time.monotonic() + self.limits.deadline_s
        return True

    def done(self, conn: Accepted) -> bool:
        """Its offer was read (or it failed): it no longer counts. False if it had been
        closed already (deadline or eviction): then its session must not start. Called
        once for each admitted connection, by its thread."""
        self._slots.release()
        with self._lock:
            return self._pending.pop(conn, None) is not None

    def expire(self) -> None:
        """Close every connection past its deadline: its thread sees the end at once."""
        now = time.monotonic()
        with self._lock:           # so that no abort() follows the thread's done()
            late = [c for c, d in self._pending.items() if d <= now]
            for c in late:
                del self._pending[c]
                c.abort()
        for c in late:
            log.warning("migration port: %s sent no offer within %g s; closed", c.peer,
                        self.limits.deadline_s)

    def abort_all(self) -> None:
        """Close every connection still waiting to offer (the daemon stops): its thread
        sees the end at once instead of waiting for the deadline."""
        with self._lock:
            waiting = list(self._pending)
            self._pending.clear()
            for c in waiting:
                c.abort()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)
