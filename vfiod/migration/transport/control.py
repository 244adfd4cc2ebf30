"""Return-path control messages and the transport's error type (docs/architecture.md §5).

Control frames travel on the migration's TCP connection beside the stream. Most go back
from the destination to the source, in the opposite direction of the stream:

* ``ACK``    progress the other end waits for; ``stage`` (``AckStage``) says which:
  ``offer`` (the destination daemon accepted the offered guest: the session follows),
  ``hello`` (the destination's facts, for the source's preflight, and this connection's
  ``challenge``), ``header`` (preflight passed on the destination, send RAM),
  ``prepared`` (everything loaded and verified; the devices wait, stopped, for COMMIT),
  ``resumed`` (devices and guest run on the destination: the source may release its
  side), ``outcome`` (the answer to an outcome query, docs/protocol.md §8.4); ``value``
  is an optional count (e.g. records read). Any other stage is refused with the value
  named.
* ``CANCEL`` the destination (or its operator) cancels: the source rolls back. After its
  MANIFEST the source cancels the same way (the stream has ended, so no ABORT record can
  follow it).
* ``ERROR``  the destination failed (``code`` is an ``ErrorCode``/errno name, ``message``
  the text, ``record`` the stream record index where known).

Three go the other way, source to destination:

* ``DIGESTS`` after the MANIFEST, the source's commit: its RAM content digests
  (``regions``, a list of ``{name, pages, digest}``), the stream's record count
  (``records``) and its last ``predicted_downtime_s``.
* ``COMMIT`` after ACK prepared, once the source has journaled its decision: resume the
  guest. It carries the ``migration_id`` and the connection's ``challenge``.
* ``REPORT`` after ACK resumed, the source's last word: the downtime it measured
  (``actual_downtime_s``), its ``predicted_downtime_s`` and the ``prediction_error``, so
  that the destination reports them too.

Cancel in the other direction is the stream's ABORT record. The frames are part of the
stream protocol (``stream.records.PROTOCOL_VERSION``; ``DIGESTS`` came with version 2,
``REPORT`` with 3, ``COMMIT`` and the ``prepared``/``outcome`` stages with 4): both ends compare versions before either sends RAM (preflight facts on
the source, the stream preamble on the destination), so a peer that speaks another
version never sees one.

Frame (20-byte header, then a UTF-8 JSON payload of at most ``MAX_CONTROL_PAYLOAD``)::

    0  4s  magic b"VFCT"
    4  u16 type (ControlType)
    6  u16 reserved (0)
    8  u32 payload length
    12 u32 crc32c of the payload
    16 u32 crc32c of header bytes 0..15

The header has its own checksum so that a damaged length is refused at once instead of
making the parser wait for bytes that will never come.

``ControlParser`` reassembles frames from whatever pieces the socket returns and refuses a
bad magic, type, stage, length or checksum with ``TransportError(code=CONTROL)``.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from vfiod.errors import VfiodError
from vfiod.migration.stream.crc32c import crc32c

CONTROL_MAGIC = b"VFCT"
_FRAME = struct.Struct("<4sHHIII")
FRAME_HEADER_SIZE = _FRAME.size
MAX_CONTROL_PAYLOAD = 64 * 1024


class TransportCode(enum.Enum):
    CONNECT = "connect"                  # the connection could not be made (errno set)
    CONNECT_TIMEOUT = "connect-timeout"
    ACCEPT_TIMEOUT = "accept-timeout"
    TIMEOUT = "timeout"                  # no progress within the I/O timeout
    PEER_CLOSED = "peer-closed"          # the other end went away
    TLS = "tls"                          # handshake or certificate failure
    CONTROL = "control"                  # a malformed return-path frame
    PEER_CANCELLED = "peer-cancelled"    # the destination sent CANCEL
    PEER_ERROR = "peer-error"            # the destination sent ERROR
    IO = "io"                            # another socket error (errno set)


class TransportError(VfiodError):
    """A transport failure: ``code`` (``TransportCode``), ``peer`` (host:port or path),
    ``errno`` where a syscall failed, and for PEER_ERROR the ``remote`` message fields."""

    def __init__(self, code: TransportCode, peer: str, message: str, *,
                 errno: int | None = None, remote: dict[str, Any] | None = None) -> None:
        self.code = code
        self.peer = peer
        self.errno = errno
        self.remote = remote or {}
        super().__init__(f"{peer}: {message}")


class ControlType(enum.IntEnum):
    ACK = 1
    CANCEL = 2
    ERROR = 3
    DIGESTS = 4
    REPORT = 5
    COMMIT = 6


class AckStage(enum.Enum):
    """What an ACK acknowledges (only these are sent)."""

    OFFER = "offer"          # the destination daemon took the offered guest
    HELLO = "hello"          # the destination's facts, for the source's preflight
    HEADER = "header"        # the destination checked the HEADER: send RAM
    PASS = "pass"            # a pre-copy pass consumed (asked for by the HEADER)
    PREPARED = "prepared"    # loaded and verified, waiting for COMMIT
    RESUMED = "resumed"      # the guest runs on the destination
    OUTCOME = "outcome"      # the answer to an outcome query (docs/protocol.md §8.4)


@dataclass(frozen=True)
class ControlMessage:
    """One control frame: its ``kind``, the ACK's ``stage`` (ACK only) and the other
    payload ``fields``."""

    kind: ControlType
    fields: dict[str, Any] = field(default_factory=dict)
    stage: AckStage | None = None

    def __post_init__(self) -> None:
        if (self.kind is ControlType.ACK) != (self.stage is not None):
            raise ValueError(f"control {self.kind.name}: a stage belongs to ACK alone, "
                             f"and every ACK has one (got {self.stage})")
        if "stage" in self.fields:
            raise ValueError("control message: the stage is not a payload field")

    @classmethod
    def ack(cls, stage: AckStage, value: int = 0, **extra: Any) -> ControlMessage:
        return cls(ControlType.ACK, {"value": value, **extra}, stage)

    @classmethod
    def cancel(cls, reason: str) -> ControlMessage:
        return cls(ControlType.CANCEL, {"reason": reason})

    @classmethod
    def error(cls, code: str, message: str, record: int | None = None) -> ControlMessage:
        return cls(ControlType.ERROR, {"code": code, "message": message, "record": record})

    @classmethod
    def digests(cls, records: int, regions: list[dict[str, Any]],
                predicted_downtime_s: float | None = None) -> ControlMessage:
        fields: dict[str, Any] = {"records": records, "regions": regions}
        if predicted_downtime_s is not None:
            fields["predicted_downtime_s"] = predicted_downtime_s
        return cls(ControlType.DIGESTS, fields)

    @classmethod
    def commit(cls, migration_id: str, challenge: str) -> ControlMessage:
        return cls(ControlType.COMMIT, {"migration_id": migration_id, "challenge": challenge})

    @classmethod
    def report(cls, actual_downtime_s: float, predicted_downtime_s: float | None,
               prediction_error: float | None) -> ControlMessage:
        return cls(ControlType.REPORT, {"actual_downtime_s": actual_downtime_s,
                                        "predicted_downtime_s": predicted_downtime_s,
                                        "prediction_error": prediction_error})

    def encode(self) -> bytes:
        body = self.fields if self.stage is None else {"stage": self.stage.value, **self.fields}
        payload = json.dumps(body, separators=(",", ":")).encode()
        if len(payload) > MAX_CONTROL_PAYLOAD:
            raise ValueError(f"control payload of {len(payload)} bytes is over "
                             f"{MAX_CONTROL_PAYLOAD}")
        head = _FRAME.pack(CONTROL_MAGIC, self.kind, 0, len(payload), crc32c(payload), 0)[:16]
        return head + struct.pack("<I", crc32c(head)) + payload


class ControlParser:
    """Incremental frame parser with a bounded buffer."""

    def __init__(self, peer: str) -> None:
        self._peer = peer
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[ControlMessage]:
        self._buf += data
        out: list[ControlMessage] = []
        while len(self._buf) >= FRAME_HEADER_SIZE:
            magic, kind, rsv, length, pcrc, hcrc = _FRAME.unpack_from(self._buf)
            if magic != CONTROL_MAGIC or crc32c(bytes(self._buf[:16])) != hcrc:
                raise self._bad("bad control frame header "
                                f"{bytes(self._buf[:FRAME_HEADER_SIZE]).hex()}")
            if rsv:
                raise self._bad(f"control frame reserved field {rsv:#x} set")
            if length > MAX_CONTROL_PAYLOAD:
                raise self._bad(f"control payload length {length} over {MAX_CONTROL_PAYLOAD}")
            if len(self._buf) < FRAME_HEADER_SIZE + length:
                break
            payload = bytes(self._buf[FRAME_HEADER_SIZE:FRAME_HEADER_SIZE + length])
            if crc32c(payload) != pcrc:
                raise self._bad("control payload checksum mismatch")
            try:
                ctype = ControlType(kind)
            except ValueError:
                raise self._bad(f"unknown control message type {kind}") from None
            try:
                fields = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise self._bad("control payload is not UTF-8 JSON") from None
            if not isinstance(fields, dict):
                raise self._bad("control payload is not an object")
            out.append(self._message(ctype, fields))
            del self._buf[:FRAME_HEADER_SIZE + length]
        return out

    def _message(self, ctype: ControlType, fields: dict[str, Any]) -> ControlMessage:
        if ctype is not ControlType.ACK:
            if "stage" in fields:
                raise self._bad(f"control {ctype.name} frame carries a stage")
            return ControlMessage(ctype, fields)
        raw = fields.pop("stage", None)
        try:
            stage = AckStage(raw)
        except ValueError:
            raise self._bad(f"unknown acknowledgement stage {raw!r}") from None
        return ControlMessage(ctype, fields, stage)

    def _bad(self, msg: str) -> TransportError:
        return TransportError(TransportCode.CONTROL, self._peer, msg)
