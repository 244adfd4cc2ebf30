"""Bad arguments to the bitmap functions: a ValueError that names the function, the
argument and the problem, and nothing written. The reference and the kernels refuse
exactly the same inputs, so every case runs against both."""

from __future__ import annotations

import re
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from vfiod.dirty import bitmap_kernels as K
from vfiod.dirty import bitmap_ref as R

IMPLS = pytest.mark.parametrize("m", [R, K], ids=["ref", "kernels"])


def words(n: int = 4, value: int = 0x0123_4567_89AB_CDEF) -> np.ndarray:
    return np.full(n, value, dtype=np.uint64)


def refused(call: Callable[[], Any], match: str, *untouched: np.ndarray) -> None:
    before = [a.copy() for a in untouched]
    with pytest.raises(ValueError, match=match):
        call()
    for a, b in zip(untouched, before, strict=True):
        assert np.array_equal(a, b), "a refused call changed its input"


BAD_ARRAYS = [
    ([1, 2, 3], "must be a numpy uint64 array, got list"),
    (np.zeros(4, dtype=np.int64), "1-D C-contiguous uint64 array, got dtype int64"),
    (np.zeros(4, dtype=np.uint32), "got dtype uint32"),
    (np.zeros((2, 2), dtype=np.uint64), "ndim 2"),
    (np.zeros(8, dtype=np.uint64)[::2], "contiguous=False"),
]


@IMPLS
@pytest.mark.parametrize(("bad", "why"), BAD_ARRAYS)
def test_bad_arrays(m: ModuleType, bad: Any, why: str) -> None:
    good = words()
    why = ".*" + re.escape(why)
    refused(lambda: m.or_merge(bad, good, 0, 64), f"or_merge: dst {why}", good)
    refused(lambda: m.or_merge(words(), bad, 0, 0), f"or_merge: src {why}")
    refused(lambda: m.popcount(bad), f"popcount: words {why}")
    refused(lambda: m.dirty_runs(bad, 0, 1), f"dirty_runs: words {why}")
    refused(lambda: m.test_and_clear(bad, 0, 0), f"test_and_clear: words {why}")
    refused(lambda: m.set_range(bad, 0, 0), f"set_range: words {why}")
    refused(lambda: m.rescale(bad, 4096, 4096, 0), f"rescale: src {why}")


@IMPLS
def test_read_only_destination(m: ModuleType) -> None:
    dst = words()
    dst.flags.writeable = False
    refused(lambda: m.or_merge(dst, words(), 0, 10), "or_merge: dst is read-only", dst)
    refused(lambda: m.test_and_clear(dst, 0, 10), "test_and_clear: words is read-only", dst)
    refused(lambda: m.set_range(dst, 0, 10), "set_range: words is read-only", dst)


@IMPLS
@pytest.mark.parametrize(("value", "why"), [
    (-1, "must be >= 0, got -1"),
    (1.0, "must be an integer, got 1.0"),
    (True, "must be an integer, got True"),
    ("3", "must be an integer, got str"),
])
def test_bad_numbers(m: ModuleType, value: Any, why: str) -> None:
    dst, src = words(), words()
    refused(lambda: m.or_merge(dst, src, value, 1), f"or_merge: dst_bit_offset {why}", dst)
    refused(lambda: m.or_merge(dst, src, 0, value), f"or_merge: nbits {why}", dst)
    refused(lambda: m.popcount(src, value), f"popcount: nbits {why}")
    refused(lambda: m.dirty_runs(src, value, 1), f"dirty_runs: nbits {why}")
    refused(lambda: m.test_and_clear(dst, value, 1), f"test_and_clear: first_bit {why}", dst)
    refused(lambda: m.set_range(dst, 1, value), f"set_range: nbits {why}", dst)
    refused(lambda: m.rescale(src, 4096, 4096, value), f"rescale: nbits {why}")


@IMPLS
def test_ranges_that_do_not_fit(m: ModuleType) -> None:
    dst, src = words(4), words(2)
    # src has 128 bits; dst has 256: the last valid offset for 128 bits is 128
    refused(lambda: m.or_merge(dst, src, 0, 129), r"or_merge: bits \[0, 129\) do not fit in "
            r"src \(2 words = 128 bits\)", dst)
    refused(lambda: m.or_merge(dst, src, 129, 128), r"bits \[129, 257\) do not fit in dst", dst)
    refused(lambda: m.popcount(src, 129), r"popcount: bits \[0, 129\) do not fit in words")
    refused(lambda: m.dirty_runs(src, 129, 4), r"dirty_runs: bits \[0, 129\) do not fit")
    refused(lambda: m.test_and_clear(dst, 200, 57), r"test_and_clear: bits \[200, 257\)", dst)
    refused(lambda: m.set_range(dst, 256, 1), r"set_range: bits \[256, 257\)", dst)
    refused(lambda: m.rescale(src, 4096, 8192, 129), r"rescale: bits \[0, 129\)")


@IMPLS
def test_edge_of_the_array_is_accepted(m: ModuleType) -> None:
    # the refusals above are exact: one bit less is fine
    dst, src = words(4), words(2)
    m.or_merge(dst, src, 128, 128)
    assert m.popcount(src, 128) == 2 * bin(0x0123_4567_89AB_CDEF).count("1")
    m.set_range(dst, 255, 1)
    assert int(dst[3]) >> 63 == 1


@IMPLS
def test_overlapping_buffers(m: ModuleType) -> None:
    buf = words(8)
    refused(lambda: m.or_merge(buf[2:], buf[:4], 3, 200), "or_merge: dst and src share memory",
            buf)
    refused(lambda: m.or_merge(buf, buf, 0, 64), "share memory", buf)


@IMPLS
def test_max_run_must_be_positive(m: ModuleType) -> None:
    refused(lambda: m.dirty_runs(words(), 10, 0), "dirty_runs: max_run must be >= 1, got 0")
    refused(lambda: m.dirty_runs(words(), 10, -5), "max_run must be >= 1")


@IMPLS
@pytest.mark.parametrize(("sp", "dp", "why"), [
    (0, 4096, "src_pgsize must be >= 1, got 0"),
    (4096, 0, "dst_pgsize must be >= 1, got 0"),
    (3000, 4096, "src_pgsize must be a power of two, got 3000"),
    (4096, 12288, "dst_pgsize must be a power of two, got 12288"),
    (4096.0, 4096, "src_pgsize must be an integer"),
])
def test_rescale_page_sizes(m: ModuleType, sp: Any, dp: Any, why: str) -> None:
    refused(lambda: m.rescale(words(), sp, dp, 64), f"rescale: {why}")


def test_pytest_does_not_collect_test_and_clear() -> None:
    # both modules export a function named test_*; it must not be mistaken for a test
    assert K.test_and_clear.__test__ is False  # type: ignore[attr-defined]
    assert R.test_and_clear.__test__ is False  # type: ignore[attr-defined]
