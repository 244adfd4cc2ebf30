"""Property-based fuzzing (hypothesis, bounded) of the stream reader, the parser a
migration peer feeds (docs/architecture.md §5): arbitrary bytes, a valid stream with bytes
changed, cut or inserted, and well-formed records of any type, arguments and payload in
any order. Whatever the input, ``StreamReader`` ends in its own ``RecordError`` (or
accepts the stream), never another exception, and never reads on past the end of its
source (a spin instead of an error)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.fuzz import fuzz_examples
from tests.support.mem_pipe import MemPipe
from tests.unit.test_stream_corruption import PS, REGIONS, STREAM, Forge
from vfiod.migration.stream import GuestRam, RecordError, RecordType, StreamReader

#: a stuck reader fails the example instead of hanging the run
_DEADLINE = timedelta(seconds=5)
#: reads after the source said "end of stream" that a correct reader never makes
_EOF_READS = 2


class EndOnce(MemPipe):
    """An in-memory source that fails the test if read on and on after its end."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads_at_end = 0

    def recv_into(self, view: memoryview) -> int:
        n = super().recv_into(view)
        if n == 0 and len(view):
            self.reads_at_end += 1
            assert self.reads_at_end <= _EOF_READS, "the reader spins at end of stream"
        return n


def read_all(data: bytes) -> None:
    """Read ``data`` as a destination does; only ``RecordError`` may end it early."""
    r = StreamReader(EndOnce(data))
    try:
        h = r.read_header()
        if h.page_size != PS or h.regions != REGIONS:
            return       # the session refuses a different layout before any RAM arrives
        r.attach_ram(GuestRam(PS, REGIONS, [bytearray(x.size) for x in REGIONS],
                              writable=True))
        for _ in r.events():
            pass
        r.expect_end()
    except RecordError:
        pass


@settings(max_examples=fuzz_examples(300), deadline=_DEADLINE)
@given(st.binary(max_size=4096))
def test_any_bytes_end_in_a_record_error(data: bytes) -> None:
    read_all(data)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    out = bytearray(STREAM)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(out)))
        match draw(st.sampled_from(["flip", "cut", "insert", "truncate"])):
            case "flip" if at < len(out):
                out[at] ^= draw(st.integers(1, 255))
            case "cut":
                del out[at:at + draw(st.integers(1, 64))]
            case "insert":
                out[at:at] = draw(st.binary(min_size=1, max_size=64))
            case _:
                del out[at:]
    return bytes(out)


@settings(max_examples=fuzz_examples(300), deadline=_DEADLINE)
@given(_mutated())
def test_a_damaged_stream_ends_in_a_record_error(data: bytes) -> None:
    read_all(data)


_U64 = st.integers(0, 2**64 - 1) | st.integers(0, 64)
_RECORD = st.tuples(st.sampled_from([int(t) for t in RecordType]) | st.integers(0, 255),
                    st.binary(max_size=256), _U64, _U64)


@settings(max_examples=fuzz_examples(300), deadline=_DEADLINE)
@given(st.lists(_RECORD, max_size=12))
def test_well_formed_records_in_any_order_end_in_a_record_error(
        records: list[tuple[int, bytes, int, int]]) -> None:
    forge = Forge()
    for rtype, payload, arg0, arg1 in records:
        forge.add(rtype, payload, arg0, arg1)
    read_all(bytes(forge.out))


def test_the_budget_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VFIOD_FUZZ_EXAMPLES", raising=False)
    assert fuzz_examples(300) == 300
    monkeypatch.setenv("VFIOD_FUZZ_EXAMPLES", "50000")
    assert fuzz_examples(300) == 50000
    monkeypatch.setenv("VFIOD_FUZZ_EXAMPLES", "0")
    with pytest.raises(ValueError, match="VFIOD_FUZZ_EXAMPLES"):
        fuzz_examples(300)
