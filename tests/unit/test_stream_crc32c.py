"""CRC-32C kernels (vfiod.migration.stream.crc32c) against the bit-at-a-time definition."""

from __future__ import annotations

import numpy as np
import pytest

from vfiod.migration.stream import crc32c as C
from vfiod.migration.stream.pagecrc import page_crcs

IMPLS = sorted(C.IMPLEMENTATIONS)


def test_known_check_value() -> None:
    # The CRC-32C catalogue's check value for the ASCII digits 1..9.
    assert C.crc32c_reference(b"123456789") == 0xE3069283
    assert C.crc32c(b"123456789") == 0xE3069283
    assert C.crc32c(b"") == 0


def test_sse42_is_used_where_the_cpu_has_it() -> None:
    flags = open("/proc/cpuinfo").read()
    if " sse4_2" in flags and "sse4.2" not in C.IMPLEMENTATIONS:
        pytest.fail("this CPU has SSE4.2 but the table kernel was chosen")
    assert C.IMPLEMENTATION in C.IMPLEMENTATIONS


@pytest.mark.parametrize("impl", IMPLS)
def test_every_length_around_the_word_and_lane_boundaries(impl: str) -> None:
    f = C.IMPLEMENTATIONS[impl]
    rng = np.random.default_rng(7)
    lane = 3 * C._LANE_MIN_WORDS * 8
    lengths = list(range(0, 70)) + [lane - 9, lane - 1, lane, lane + 1, lane + 7, lane + 8,
                                     3 * lane + 5, 65537]
    for n in lengths:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert f(data) == C.crc32c_reference(data), f"{impl} length {n}"


@pytest.mark.parametrize("impl", IMPLS)
def test_buffer_kinds_and_unaligned_slices(impl: str) -> None:
    f = C.IMPLEMENTATIONS[impl]
    rng = np.random.default_rng(8)
    raw = rng.integers(0, 256, 20000, dtype=np.uint8)
    b = raw.tobytes()
    for start in range(0, 9):  # every alignment of the first word
        want = C.crc32c_reference(b[start:start + 12345])
        assert f(b[start:start + 12345]) == want
        assert f(memoryview(b)[start:start + 12345]) == want
        assert f(memoryview(bytearray(b))[start:start + 12345]) == want
        assert f(raw[start:start + 12345]) == want
    # a non-byte memoryview is read as its bytes
    words = np.frombuffer(b[:16000], dtype=np.uint64)
    assert f(memoryview(words)) == C.crc32c_reference(b[:16000])


@pytest.mark.parametrize("impl", IMPLS)
def test_continuation_equals_one_pass(impl: str) -> None:
    f = C.IMPLEMENTATIONS[impl]
    data = bytes(range(256)) * 50
    for cut in (0, 1, 7, 8, 4096, 6000, len(data)):
        assert f(data[cut:], f(data[:cut])) == f(data)


def test_combine() -> None:
    rng = np.random.default_rng(9)
    for la, lb in ((0, 0), (0, 5), (5, 0), (1, 1), (100, 3000), (4096, 4096 * 3 + 1)):
        a = rng.integers(0, 256, la, dtype=np.uint8).tobytes()
        b = rng.integers(0, 256, lb, dtype=np.uint8).tobytes()
        assert C.crc32c_combine(C.crc32c(a), C.crc32c(b), lb) == C.crc32c(a + b)
    with pytest.raises(ValueError, match="negative length"):
        C.crc32c_combine(1, 2, -1)


def test_gf2_arithmetic() -> None:
    one = 1 << 31  # x^0 in the reflected form
    for v in (0, 1, 0x12345678, 0xFFFFFFFF):
        assert C.gf2_mulmod(one, v) == v
        assert C.gf2_mulmod(v, one) == v
        assert C.gf2_mulmod(0, v) == 0


def test_every_single_bit_flip_changes_the_crc() -> None:
    data = bytearray(b"vfiod" * 100)
    good = C.crc32c(data)
    for i in range(len(data)):
        for bit in range(8):
            data[i] ^= 1 << bit
            assert C.crc32c(data) != good
            data[i] ^= 1 << bit


def test_warm_up_names_the_implementation() -> None:
    assert C.warm_up() == C.IMPLEMENTATION


@pytest.mark.parametrize("impl", IMPLS)
def test_page_crcs_are_the_crc_of_each_page(impl: str) -> None:
    rng = np.random.default_rng(10)
    for page_size in (4096, 8192):
        for n in range(0, 8):  # around the three-pages-at-once grouping
            data = rng.integers(0, 256, n * page_size, dtype=np.uint8).tobytes()
            got = page_crcs(memoryview(data), page_size, implementation=impl)
            want = [C.crc32c_reference(data[i * page_size:(i + 1) * page_size])
                    for i in range(n)]
            assert got.dtype == np.uint32 and got.tolist() == want, (impl, page_size, n)


@pytest.mark.parametrize("impl", IMPLS)
def test_page_crcs_of_every_record_size_up_to_forty_pages(impl: str) -> None:
    # The kernel runs pages a third of the record apart side by side: every count, with
    # its remainder, must still give page i the CRC of page i (checked against the
    # whole-buffer function, itself checked against the definition above).
    rng = np.random.default_rng(11)
    data = rng.integers(0, 256, 40 * 4096, dtype=np.uint8).tobytes()
    want = [C.crc32c(data[i * 4096:(i + 1) * 4096]) for i in range(40)]
    for n in range(1, 41):
        got = page_crcs(memoryview(data)[:n * 4096], 4096, implementation=impl)
        assert got.tolist() == want[:n], (impl, n)


def test_page_crcs_refuse_partial_pages_and_bad_output() -> None:
    with pytest.raises(ValueError, match="not whole pages"):
        page_crcs(bytes(5000), 4096)
    with pytest.raises(ValueError, match="uint32 array of 2 entries"):
        page_crcs(bytes(8192), 4096, out=np.empty(3, dtype=np.uint32))
    out = np.zeros(2, dtype=np.uint32)
    assert page_crcs(bytes(8192), 4096, out=out) is out
