"""Property-based fuzzing (hypothesis, bounded) of the two parsers any client or operator
feeds: a control-protocol line and a configuration file. Whatever the input, the answer is
the parser's own error type, never another exception (README "Limits"). ``make fuzz``
raises every budget (``tests/support/fuzz.py``)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.fuzz import fuzz_examples
from vfiod.api.schema import ApiError, Request, json_depth
from vfiod.daemon.config import parse_config
from vfiod.errors import ConfigError

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=40)


@settings(max_examples=fuzz_examples(400), deadline=None)
@given(st.binary(max_size=512) | st.text(max_size=512).map(str.encode))
def test_any_line_is_a_request_or_an_api_error(line: bytes) -> None:
    try:
        Request.decode(line)
    except ApiError:
        pass


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(st.fixed_dictionaries({"schema": st.integers(0, 2), "op": st.text(max_size=10)},
                             optional={"id": _JSON, "args": _JSON, "extra": _JSON}))
def test_any_json_envelope_is_a_request_or_an_api_error(obj: dict[str, Any]) -> None:
    try:
        req = Request.decode(json.dumps(obj))
    except ApiError:
        return
    assert req.op == obj["op"]


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(_JSON)
def test_depth_matches_the_structure(value: Any) -> None:
    def depth(v: Any) -> int:
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        return 0
    assert json_depth(json.dumps(value).encode()) == depth(value)


_KEYS = st.sampled_from(["memory", "size", "gpa", "name", "downtime_limit_ms", "timeout_s",
                         "bandwidth_limit", "page_size", "listen", "state_size", "start"])
_VALUES = st.one_of(st.integers().map(str), st.floats().map(repr), st.text(max_size=12).map(json.dumps),
                    st.sampled_from(['"4GiB"', '"1e9TiB"', "nan", "inf", "-inf", "true",
                                     '"' + "9" * 40 + 'TiB"', "[]", "{}"]))
_TABLES = st.sampled_from(["[migration]", "[[guest]]", "[[guest.ram]]", "[[guest.device]]",
                           "[sim]", "[[sim.device]]", "[control]", "[paths]"])


@settings(max_examples=fuzz_examples(400), deadline=None)
@given(st.lists(st.one_of(_TABLES, st.tuples(_KEYS, _VALUES).map(" = ".join)),
                max_size=14))
def test_any_config_is_a_config_or_a_config_error(lines: list[str]) -> None:
    try:
        parse_config("\n".join(lines) + "\n", host_memory=1 << 34)
    except ConfigError as e:
        assert str(e).startswith("(text)")


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_a_config_or_a_config_error(text: str) -> None:
    try:
        parse_config(text, host_memory=1 << 34)
    except ConfigError:
        pass
