"""The control protocol's envelope and operation arguments (vfiod.api): round trips, and
a clear error with a stable code for every kind of bad input."""

from __future__ import annotations

import json

import pytest

from vfiod.api import (
    MAX_LINE,
    SCHEMA_VERSION,
    ApiError,
    ApiErrorCode,
    AttachArgs,
    CheckArgs,
    DetachArgs,
    DirtyTrackingArgs,
    MigrateArgs,
    NoArgs,
    RamHandOver,
    Request,
    RequestError,
    Response,
    StatusArgs,
    args_to_json,
    parse_args,
    parse_host_port,
)
from vfiod.errors import ProtocolError


def test_request_round_trip() -> None:
    req = Request("migrate", {"guest": "g1", "to": "10.0.0.2:4444"}, 7)
    line = req.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert Request.decode(line) == req
    assert json.loads(line)["schema"] == SCHEMA_VERSION


def test_text_with_newlines_stays_on_one_line() -> None:
    line = Response.failure(1, ApiError(ApiErrorCode.FAILED, "two\nlines")).encode()
    assert line.count(b"\n") == 1
    assert Response.decode(line).error.message == "two\nlines"  # type: ignore[union-attr]


@pytest.mark.parametrize("line, code, fragment", [
    (b"not json", ApiErrorCode.BAD_JSON, "not valid JSON"),
    (b"[1, 2]", ApiErrorCode.BAD_JSON, "must be a JSON object, not list"),
    (b'{"id": 1, "op": "status"}', ApiErrorCode.BAD_REQUEST, "'schema' (integer) is required"),
    (b'{"schema": 2, "id": 1, "op": "status"}', ApiErrorCode.UNSUPPORTED_SCHEMA,
     "schema 2 is not supported"),
    (b'{"schema": 1, "id": 1}', ApiErrorCode.BAD_REQUEST, "'op'"),
    (b'{"schema": 1, "id": 1, "op": "status", "args": []}', ApiErrorCode.BAD_REQUEST,
     "'args' must be a JSON object"),
    (b'{"schema": 1, "id": true, "op": "status"}', ApiErrorCode.BAD_REQUEST, "'id' must be"),
    (b'{"schema": 1, "id": 1, "op": "status", "extra": 1}', ApiErrorCode.BAD_REQUEST,
     "unknown request field(s) ['extra']"),
    (b"x" * (MAX_LINE + 1), ApiErrorCode.TOO_LARGE, "exceeds"),
])
def test_bad_envelopes(line: bytes, code: ApiErrorCode, fragment: str) -> None:
    with pytest.raises(ApiError) as exc:
        Request.decode(line)
    assert exc.value.code is code
    assert fragment in exc.value.message


def test_bad_envelope_keeps_the_request_id() -> None:
    with pytest.raises(RequestError) as exc:
        Request.decode(b'{"schema": 9, "id": "abc", "op": "status"}')
    assert exc.value.request_id == "abc"


@pytest.mark.parametrize("op, raw, expected", [
    ("hello", {}, NoArgs()),
    ("status", {}, StatusArgs(None)),
    ("status", {"guest": "g1"}, StatusArgs("g1")),
    ("check", {"target": "0000:3b:00.1"}, CheckArgs("0000:3b:00.1")),
    ("dirty_tracking", {"device": "0000:3b:00.1", "enabled": False},
     DirtyTrackingArgs("0000:3b:00.1", False)),
    ("migrate", {"guest": "g1", "to": "[fd00::2]:4444", "timeout_s": 30,
                 "on_timeout": "force"},
     MigrateArgs("g1", "fd00::2", 4444, None, 30.0, "force")),
    ("migrate", {"guest": "g1", "to": "h:1", "channels": 4},
     MigrateArgs("g1", "h", 1, channels=4)),
    ("attach", {"guest": "g1", "ram": [{"region": "ram", "gpa": 0, "size": 4096,
                                        "offset": 8192, "fd": 0}]},
     AttachArgs("g1", (RamHandOver("ram", 0, 4096, 8192, 0),))),
    ("detach", {"guest": "g1"}, DetachArgs("g1")),
])
def test_args_parse_and_round_trip(op: str, raw: dict, expected: object) -> None:
    args = parse_args(op, raw)
    assert args == expected
    assert parse_args(op, args_to_json(args)) == args


@pytest.mark.parametrize("op, raw, code, fragment", [
    ("reboot", {}, ApiErrorCode.UNKNOWN_OP, "unknown operation 'reboot'"),
    ("devices", {"x": 1}, ApiErrorCode.BAD_REQUEST, "unknown argument(s) ['x'] (allowed: none)"),
    ("check", {}, ApiErrorCode.BAD_REQUEST, "check: argument 'target' is required"),
    ("check", {"target": "a b"}, ApiErrorCode.BAD_REQUEST, "must be a guest or device name"),
    ("cancel", {"guest": 3}, ApiErrorCode.BAD_REQUEST, "must be a guest or device name"),
    ("dirty_tracking", {"device": "d", "enabled": "yes"}, ApiErrorCode.BAD_REQUEST,
     "'enabled' must be true or false"),
    ("migrate", {"guest": "g1"}, ApiErrorCode.BAD_REQUEST, "argument 'to'"),
    ("migrate", {"guest": "g1", "to": "host"}, ApiErrorCode.BAD_REQUEST, "must be HOST:PORT"),
    ("migrate", {"guest": "g1", "to": "host:0"}, ApiErrorCode.BAD_REQUEST, "port 0"),
    ("migrate", {"guest": "g1", "to": "h:1", "downtime_limit_ms": -5}, ApiErrorCode.BAD_REQUEST,
     "'downtime_limit_ms' must be a number"),
    ("migrate", {"guest": "g1", "to": "h:1", "on_timeout": "force"}, ApiErrorCode.BAD_REQUEST,
     "needs 'timeout_s'"),
    ("migrate", {"guest": "g1", "to": "h:1", "timeout_s": 5, "on_timeout": "panic"},
     ApiErrorCode.BAD_REQUEST, "must be one of ['cancel', 'force']"),
    ("migrate", {"guest": "g1", "to": "h:1", "channels": 17}, ApiErrorCode.BAD_REQUEST,
     "argument 'channels' must be an integer from 1 to 16, not 17"),
    ("migrate", {"guest": "g1", "to": "h:1", "channels": True}, ApiErrorCode.BAD_REQUEST,
     "argument 'channels' must be an integer from 1 to 16, not True"),
    ("attach", {"guest": "g1"}, ApiErrorCode.BAD_REQUEST, "'ram' must be a list of 1..64"),
    ("attach", {"guest": "g1", "ram": [{"region": "ram"}]}, ApiErrorCode.BAD_REQUEST,
     "ram[0] must have exactly the keys ['region', 'gpa', 'size', 'offset', 'fd']"),
    ("attach", {"guest": "g1", "ram": [{"region": "ram", "gpa": 0, "size": -1, "offset": 0,
                                        "fd": 0}]},
     ApiErrorCode.BAD_REQUEST, "ram[0].size must be a non-negative integer, not -1"),
    ("attach", {"guest": "g1", "ram": [{"region": "ram", "gpa": 0, "size": 1, "offset": 0,
                                        "fd": True}]},
     ApiErrorCode.BAD_REQUEST, "ram[0].fd must be a non-negative integer, not True"),
    ("attach", {"guest": "g1", "ram": [{"region": "r", "gpa": 0, "size": 1, "offset": 0,
                                        "fd": 0}] * 2},
     ApiErrorCode.BAD_REQUEST, "ram[1]: region 'r' is handed over twice"),
    ("attach", {"guest": "g1", "ram": [], "fds": [3]}, ApiErrorCode.BAD_REQUEST,
     "unknown argument(s) ['fds']"),
])
def test_bad_args(op: str, raw: dict, code: ApiErrorCode, fragment: str) -> None:
    with pytest.raises(ApiError) as exc:
        parse_args(op, raw)
    assert exc.value.code is code
    assert fragment in exc.value.message


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.2:4444", ("10.0.0.2", 4444)), ("host-b.example:1", ("host-b.example", 1)),
    ("[::1]:0", ("::1", 0)),
])
def test_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("::1:4444", "[ADDR]:PORT"), ("[::1]4444", "[ADDR]:PORT"), ("[zz]:1", "not an IPv6"),
    ("h:99999", "0..65535"), (":5", "HOST:PORT"), ("bad_host:5", "not a host name"),
])
def test_bad_host_port(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=None) as exc:
        parse_host_port(text)
    assert fragment in str(exc.value)


def test_response_decode_rejects_garbage_and_keeps_unknown_codes() -> None:
    with pytest.raises(ProtocolError, match="bad response"):
        Response.decode(b"{nope")
    with pytest.raises(ProtocolError, match="without 'schema' or 'ok'"):
        Response.decode(b'{"id": 1}')
    r = Response.decode(b'{"schema":1,"id":1,"ok":false,"error":{"code":"new_code",'
                        b'"message":"m"}}')
    assert r.error is not None and r.error.code is ApiErrorCode.FAILED and r.error.message == "m"


def test_the_api_channel_bound_is_the_streams() -> None:
    from vfiod.api.ops import MAX_MIGRATION_CHANNELS
    from vfiod.migration.stream.header import MAX_CHANNELS
    assert MAX_MIGRATION_CHANNELS == MAX_CHANNELS
