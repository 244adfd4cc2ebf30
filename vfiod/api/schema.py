"""The control protocol's envelope: one JSON object per line, with a schema version
(docs/architecture.md §6 "JSON messages with a schema version").

A leaf module: it imports nothing of vfiod but ``errors``, so the daemon, ``vfiod ctl`` and
third-party automation share one definition of what goes over the control socket.

Request (client → daemon), one line::

    {"schema": 1, "id": 7, "op": "migrate", "args": {"guest": "g1", "to": "10.0.0.2:4444"}}

Response (daemon → client), one line, same ``id``::

    {"schema": 1, "id": 7, "ok": true, "result": {...}}
    {"schema": 1, "id": 7, "ok": false, "error": {"code": "not_found", "message": "..."}}

``code`` is one of ``ApiErrorCode``: clients branch on it, never on the message text. A client
may send many requests on one connection; the daemon answers each in order. Lines are at
most ``MAX_LINE`` bytes and nest at most ``MAX_DEPTH`` arrays and objects deep (a request
needs three). A daemon answers a request with a higher schema than it speaks
with ``unsupported_schema`` naming the versions it does speak.
"""

from __future__ import annotations

import enum
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from vfiod.errors import ProtocolError

#: The control-protocol schema this module speaks. Bump on an incompatible change.
SCHEMA_VERSION = 1
#: Oldest schema still accepted from a client.
MIN_SCHEMA_VERSION = 1
#: Longest accepted line, newline included (a request is a few hundred bytes).
MAX_LINE = 1 << 20
#: Deepest accepted nesting of arrays and objects: the parser recurses once per level, and
#: a line of 100,000 ``[`` must get an answer, not exhaust the interpreter's stack.
MAX_DEPTH = 32

RequestId = int | str | None


class ApiErrorCode(enum.Enum):
    """Why a request failed: the stable, machine-readable part of an error response."""

    BAD_JSON = "bad_json"                      # the line is not a JSON object
    BAD_REQUEST = "bad_request"                # well-formed JSON, wrong shape or argument
    UNSUPPORTED_SCHEMA = "unsupported_schema"  # schema version this daemon does not speak
    UNKNOWN_OP = "unknown_op"
    TOO_LARGE = "too_large"                    # the line exceeds MAX_LINE
    TIMEOUT = "timeout"                        # idle past the control socket's timeout
    PERMISSION_DENIED = "permission_denied"    # peer is neither root nor in the vfiod group
    NOT_FOUND = "not_found"                    # no such guest / device / migration
    BUSY = "busy"                              # conflicts with a migration in progress
    FAILED = "failed"                          # the operation ran and failed (message: why)
    INTERNAL = "internal"                      # a daemon bug; the daemon keeps serving


class ApiError(ProtocolError):
    """A request cannot be served; ``code`` says why (branch on it, not on the text)."""

    def __init__(self, code: ApiErrorCode, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code.value}: {message}")

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


def _check_id(value: object) -> RequestId:
    # bool is an int subclass; an id of true/false is almost certainly a client bug.
    if value is None or (isinstance(value, int | str) and not isinstance(value, bool)):
        return value
    raise ApiError(ApiErrorCode.BAD_REQUEST,
                   f"'id' must be an integer, a string or null, not {type(value).__name__}")


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_OPENERS = b"[{"
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def json_depth(line: bytes) -> int:
    """How deep ``line`` nests arrays and objects, counted without parsing it (brackets
    inside strings do not count), so that the check itself cannot recurse."""
    brackets = _JSON_STRING.sub(b"", line).translate(None, delete=_NOT_BRACKETS)
    steps = (1 if c in _OPENERS else -1 for c in brackets)
    return max(itertools.accumulate(steps, initial=0))


def _load_object(line: bytes | str, what: str) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise ApiError(ApiErrorCode.TOO_LARGE,
                       f"{what} of {len(line)} bytes exceeds the {MAX_LINE}-byte limit")
    raw = line.encode() if isinstance(line, str) else line
    # A line with at most MAX_DEPTH openers cannot nest deeper (a request has two): only
    # the others pay for the count (README "Load").
    depth = 0 if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH else json_depth(raw)
    if depth > MAX_DEPTH:
        raise ApiError(ApiErrorCode.BAD_REQUEST, f"{what} nests {depth} levels of arrays and "
                       f"objects; the limit is {MAX_DEPTH}")
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(ApiErrorCode.BAD_JSON, f"{what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ApiError(ApiErrorCode.BAD_JSON,
                       f"{what} must be a JSON object, not {type(obj).__name__}")
    return obj


@dataclass(frozen=True)
class Request:
    """One request; ``args`` are still raw JSON values (``ops.parse_args`` types them)."""

    op: str
    args: dict[str, Any] = field(default_factory=dict)
    id: RequestId = None
    schema: int = SCHEMA_VERSION

    def encode(self) -> bytes:
        return _line({"schema": self.schema, "id": self.id, "op": self.op, "args": self.args})

    @classmethod
    def decode(cls, line: bytes | str) -> Request:
        """Parse one line; ``ApiError`` (with the request id when it could be read) if the
        envelope is wrong. Argument values are checked later, per operation."""
        obj = _load_object(line, "request")
        rid = obj.get("id")
        try:
            rid = _check_id(rid)
            unknown = sorted(set(obj) - {"schema", "id", "op", "args"})
            if unknown:
                raise ApiError(ApiErrorCode.BAD_REQUEST,
                               f"unknown request field(s) {unknown}; a request has "
                               "schema, id, op, args")
            schema = obj.get("schema")
            if not isinstance(schema, int) or isinstance(schema, bool):
                raise ApiError(ApiErrorCode.BAD_REQUEST,
                               "'schema' (integer) is required: this daemon speaks "
                               f"schema {MIN_SCHEMA_VERSION}..{SCHEMA_VERSION}")
            if not MIN_SCHEMA_VERSION <= schema <= SCHEMA_VERSION:
                raise ApiError(ApiErrorCode.UNSUPPORTED_SCHEMA,
                               f"schema {schema} is not supported: this daemon speaks "
                               f"{MIN_SCHEMA_VERSION}..{SCHEMA_VERSION}")
            op = obj.get("op")
            if not isinstance(op, str) or not op:
                raise ApiError(ApiErrorCode.BAD_REQUEST, "'op' (a non-empty string) is required")
            args = obj.get("args", {})
            if args is None:
                args = {}
            if not isinstance(args, dict):
                raise ApiError(ApiErrorCode.BAD_REQUEST,
                               f"'args' must be a JSON object, not {type(args).__name__}")
        except ApiError as e:
            raise RequestError(e.code, e.message, rid if _valid_id(rid) else None) from None
        return cls(op, args, rid, schema)


def _valid_id(value: object) -> bool:
    return value is None or (isinstance(value, int | str) and not isinstance(value, bool))


class RequestError(ApiError):
    """A malformed request whose ``id`` could still be read (the error echoes it)."""

    def __init__(self, code: ApiErrorCode, message: str, request_id: RequestId) -> None:
        super().__init__(code, message)
        self.request_id = request_id


class EncodedResult(dict[str, Any]):
    """A result encoded once, when it is made: one ``status`` answer shared by many
    requests is not encoded again for each (README "Load"). Do not change it after: its
    JSON text would no longer match. ``encoded``: the text when the caller made it from
    pieces, each encoded by ``compact_json`` (``daemon/status_pieces.py``); it must be what
    ``compact_json(value)`` gives."""

    def __init__(self, value: dict[str, Any], encoded: bytes | None = None) -> None:
        super().__init__(value)
        self.encoded = compact_json(value) if encoded is None else encoded


@dataclass(frozen=True)
class Response:
    """One answer. Exactly one of ``result`` (ok) and ``error`` (not ok) is set."""

    id: RequestId
    ok: bool
    result: dict[str, Any] | None = None
    error: ApiError | None = None
    schema: int = SCHEMA_VERSION

    @classmethod
    def success(cls, request_id: RequestId, result: dict[str, Any]) -> Response:
        return cls(request_id, True, result=result)

    @classmethod
    def failure(cls, request_id: RequestId, error: ApiError) -> Response:
        return cls(request_id, False, error=error)

    def encode(self) -> bytes:
        if self.ok and isinstance(self.result, EncodedResult):   # the same text, spliced
            return (b'{"schema":%s,"id":%s,"ok":true,"result":%s}\n'
                    % (compact_json(self.schema), compact_json(self.id), self.result.encoded))
        body: dict[str, Any] = {"schema": self.schema, "id": self.id, "ok": self.ok}
        if self.ok:
            body["result"] = self.result if self.result is not None else {}
        else:
            err = self.error or ApiError(ApiErrorCode.INTERNAL, "error response without error")
            body["error"] = err.to_dict()
        return _line(body)

    @classmethod
    def decode(cls, line: bytes | str) -> Response:
        """Parse a daemon's answer; ``ProtocolError`` if it is not a valid response."""
        try:
            obj = _load_object(line, "response")
        except ApiError as e:
            raise ProtocolError(f"daemon sent a bad response: {e.message}") from None
        schema, ok = obj.get("schema"), obj.get("ok")
        if not isinstance(schema, int) or not isinstance(ok, bool):
            raise ProtocolError("daemon sent a response without 'schema' or 'ok'")
        if not _valid_id(obj.get("id")):
            raise ProtocolError("daemon sent a response with a bad 'id'")
        rid = obj.get("id")
        if ok:
            result = obj.get("result", {})
            if not isinstance(result, dict):
                raise ProtocolError("daemon sent a response whose 'result' is not an object")
            return cls(rid, True, result=result, schema=schema)
        err = obj.get("error")
        if not isinstance(err, dict) or not isinstance(err.get("message"), str):
            raise ProtocolError("daemon sent an error response without error.message")
        try:
            code = ApiErrorCode(err.get("code"))
        except ValueError:
            # A newer daemon may know more codes: keep the message, treat it as a failure.
            code = ApiErrorCode.FAILED
        return cls(rid, False, error=ApiError(code, err["message"]), schema=schema)


def _line(obj: dict[str, Any]) -> bytes:
    return compact_json(obj) + b"\n"


def compact_json(value: Any) -> bytes:
    """The JSON text of every line (and of an ``EncodedResult``)."""
    # Compact separators keep lines short; ensure_ascii keeps them one line whatever the
    # text (a newline inside a string is escaped, never raw).
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode()
