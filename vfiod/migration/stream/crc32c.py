"""CRC-32C (Castagnoli), the checksum of every migration stream record (docs/architecture.md §5).

Why CRC-32C and why here: the stream must be checked end to end, yet the checked RAM
stream has to keep up with a loopback socket (several GB/s). ``zlib.crc32`` is the other
polynomial and, on one core, slower than the socket; a cryptographic hash is slower still.
x86-64 CPUs since 2008 (SSE4.2) compute CRC-32C in one instruction per 8 bytes, so this
module emits that instruction through numba (an LLVM intrinsic) and runs three independent
lanes over thirds of the buffer, which hides the instruction's 3-cycle latency; the lanes
are joined with the CRC "shift" identity (multiplication by x^(8n) mod P in GF(2)).
Measured on the project's 2-core machine: about 17 GB/s on one core, GIL released.

Where SSE4.2 is absent (another architecture, or ``NUMBA_CPU_NAME`` forcing a generic
target), a table kernel (slicing by 8, numba) gives the same values more slowly. Both are
checked against ``crc32c_reference`` (bit at a time, the definition) in the unit tests.

Public API:

* ``crc32c(data, crc=0) -> int``: CRC-32C of a bytes-like object; pass a previous result as
  ``crc`` to continue over a following piece (``crc32c(b, crc32c(a)) == crc32c(a + b)``).
* ``crc32c_combine(crc_a, crc_b, len_b) -> int``: CRC of ``a + b`` from the two CRCs.
* ``IMPLEMENTATION``: ``"sse4.2"`` or ``"table"``, for status and benchmarks.
* ``warm_up()``: compile (or load from numba's cache) before a migration starts.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

#: The reflected Castagnoli polynomial (x^32 implied).
POLY = 0x82F63B78
_MASK32 = 0xFFFFFFFF

#: Below this many 8-byte words a single lane is as fast as three plus the join.
_LANE_MIN_WORDS = 256


# -- GF(2) arithmetic on reflected 32-bit polynomials (pure Python; also the oracle) -------

def _mul_x(b: int) -> int:
    """b * x mod P (reflected: x^31 is bit 0, so multiplying by x shifts right)."""
    return (b >> 1) ^ POLY if b & 1 else b >> 1


def gf2_mulmod(a: int, b: int) -> int:
    """a * b mod P, both reflected (bit 31 is x^0)."""
    p = 0
    for i in range(32):
        if a & (1 << (31 - i)):
            p ^= b
        b = _mul_x(b)
    return p


def _x_pow2_table() -> list[int]:
    """x^(2^k) mod P for k = 0..63 (x^1 is bit 30 in the reflected form)."""
    out = [1 << 30]
    for _ in range(63):
        out.append(gf2_mulmod(out[-1], out[-1]))
    return out


_X2N = _x_pow2_table()


def _x_pow_bytes(nbytes: int) -> int:
    """x^(8 * nbytes) mod P: shifting a CRC register over ``nbytes`` zero bytes."""
    p, k, m = 1 << 31, 0, 8 * nbytes
    while m:
        if m & 1:
            p = gf2_mulmod(_X2N[k], p)
        m >>= 1
        k += 1
    return p


def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC-32C of ``a + b`` given ``crc32c(a)``, ``crc32c(b)`` and ``len(b)``."""
    if len_b < 0:
        raise ValueError(f"crc32c_combine: negative length {len_b}")
    return gf2_mulmod(_x_pow_bytes(len_b), crc_a) ^ crc_b


def crc32c_reference(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The definition, one bit at a time. Slow: tests and tiny inputs only."""
    reg = crc ^ _MASK32
    for byte in bytes(data):
        reg ^= byte
        for _ in range(8):
            reg = _mul_x(reg)
    return reg ^ _MASK32


def _tables() -> np.ndarray:
    """Slicing-by-8 tables: row 0 is the byte table, row k advances k more zero bytes."""
    t = np.zeros((8, 256), dtype=np.uint64)
    for i in range(256):
        reg = i
        for _ in range(8):
            reg = _mul_x(reg)
        t[0, i] = reg
    for k in range(1, 8):
        for i in range(256):
            prev = int(t[k - 1, i])
            t[k, i] = (prev >> 8) ^ int(t[0, prev & 0xFF])
    return t


# -- numba kernels ----------------------------------------------------------------------

_TABLES = _tables()
_X2N_ARR = np.array(_X2N, dtype=np.uint64)
_U0 = np.uint64(0)
_U1 = np.uint64(1)
_U8 = np.uint64(8)
_U24 = np.uint64(24)
_U31 = np.uint64(31)
_U32 = np.uint64(32)
_FF = np.uint64(0xFF)
_M32 = np.uint64(_MASK32)
_POLY_U = np.uint64(POLY)
_TOP = np.uint64(1 << 31)


@intrinsic
def _crc32_u64(typingctx, crc, word):
    """The SSE4.2 ``crc32 r64, r/m64`` instruction (CRC-32C, reflected, no inversion)."""
    sig = types.uint64(types.uint64, types.uint64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(64)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse42.crc32.64.64")
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _crc32_u8(typingctx, crc, byte):
    """The SSE4.2 ``crc32 r32, r/m8`` instruction."""
    sig = types.uint64(types.uint64, types.uint8)

    def codegen(context, builder, signature, args):
        i32, i8 = ir.IntType(32), ir.IntType(8)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [i32, i8]),
                                            "llvm.x86.sse42.crc32.32.8")
        res = builder.call(fn, [builder.trunc(args[0], i32), args[1]])
        return builder.zext(res, ir.IntType(64))

    return sig, codegen


@njit(nogil=True, cache=True)
def _nb_mulmod(a, b):
    p = _U0
    for i in range(32):
        if a & (_TOP >> np.uint64(i)):
            p ^= b
        b = (b >> _U1) ^ _POLY_U if b & _U1 else b >> _U1
    return p


@njit(nogil=True, cache=True)
def _nb_x_pow_bytes(nbytes, x2n):
    p = _TOP
    m = np.uint64(nbytes) * _U8
    k = 0
    while m:
        if m & _U1:
            p = _nb_mulmod(x2n[k], p)
        m >>= _U1
        k += 1
    return p


@njit(nogil=True, cache=True)
def _crc_sse42(buf, crc, x2n):
    # ``buf`` is any 1-D byte buffer (bytes, bytearray, memoryview): numba reads it in
    # place, so a call costs about a microsecond plus the bytes.
    data = np.frombuffer(buf, np.uint8)
    nbytes = data.size
    cut = nbytes - (nbytes & 7)
    words = data[:cut].view(np.uint64)
    reg = np.uint64(crc) ^ _M32
    n = words.shape[0]
    start = 0
    if n >= 3 * _LANE_MIN_WORDS:
        # Three independent dependency chains; lanes b and c start from a zero register.
        lane = n // 3
        b = _U0
        c = _U0
        for i in range(lane):
            reg = _crc32_u64(reg, words[i])  # type: ignore[call-arg]
            b = _crc32_u64(b, words[lane + i])
            c = _crc32_u64(c, words[2 * lane + i])
        shift = _nb_x_pow_bytes(lane * 8, x2n)
        reg = _nb_mulmod(shift, reg) ^ b
        reg = _nb_mulmod(shift, reg) ^ c
        start = 3 * lane
    for i in range(start, n):
        reg = _crc32_u64(reg, words[i])  # type: ignore[call-arg]
    for j in range(cut, nbytes):
        reg = _crc32_u8(reg, data[j])  # type: ignore[call-arg]
    return reg ^ _M32


@njit(nogil=True, cache=True)
def _crc_table(buf, crc, t):
    data = np.frombuffer(buf, np.uint8)
    nbytes = data.size
    cut = nbytes - (nbytes & 7)
    words = data[:cut].view(np.uint64)  # little-endian loads (checked by the caller)
    reg = np.uint64(crc) ^ _M32
    for i in range(words.shape[0]):
        w = words[i]
        lo = (reg ^ w) & _M32
        hi = w >> _U32
        reg = (t[7, lo & _FF] ^ t[6, (lo >> _U8) & _FF] ^ t[5, (lo >> np.uint64(16)) & _FF]
               ^ t[4, lo >> _U24] ^ t[3, hi & _FF] ^ t[2, (hi >> _U8) & _FF]
               ^ t[1, (hi >> np.uint64(16)) & _FF] ^ t[0, hi >> _U24])
    for j in range(cut, nbytes):
        reg = (reg >> _U8) ^ t[0, (reg ^ np.uint64(data[j])) & _FF]
    return reg ^ _M32


# -- selection and the Python entry points ----------------------------------------------

def _sse42_usable() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.byteorder != "little":
        return False
    # A generic numba target would make LLVM abort on the intrinsic: never risk it.
    cpu_name = os.environ.get("NUMBA_CPU_NAME", "")
    cpu_feat = os.environ.get("NUMBA_CPU_FEATURES", "")
    if cpu_name and cpu_name != "host":
        return False
    if cpu_feat and "+sse4.2" not in cpu_feat:
        return False
    try:
        from llvmlite import binding
        return bool(binding.get_host_cpu_features().get("sse4.2", False))
    except Exception:  # noqa: BLE001 - any doubt means the portable kernel
        return False


def _as_bytes(data: object) -> object:
    """A 1-D unsigned-byte buffer numba can read in place (no copy)."""
    if type(data) in (bytes, bytearray):
        return data
    mv = data if type(data) is memoryview else memoryview(data)  # type: ignore[arg-type]
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _crc_with_sse42(data: object, crc: int = 0) -> int:
    return int(_crc_sse42(_as_bytes(data), np.uint64(crc & _MASK32), _X2N_ARR))


def _crc_with_table(data: object, crc: int = 0) -> int:
    if sys.byteorder != "little":  # the word kernel assumes little-endian loads
        return crc32c_reference(memoryview(data).cast("B"), crc)  # type: ignore[arg-type]
    return int(_crc_table(_as_bytes(data), np.uint64(crc & _MASK32), _TABLES))


#: Every kernel this machine can run, by name (the tests check each against the reference).
IMPLEMENTATIONS: dict[str, Callable[..., int]] = {"table": _crc_with_table}
if _sse42_usable():
    IMPLEMENTATIONS["sse4.2"] = _crc_with_sse42

IMPLEMENTATION = "sse4.2" if "sse4.2" in IMPLEMENTATIONS else "table"
_crc_impl = IMPLEMENTATIONS[IMPLEMENTATION]


def crc32c(data: bytes | bytearray | memoryview | np.ndarray, crc: int = 0) -> int:
    """CRC-32C of ``data`` (any contiguous buffer), continuing from ``crc``."""
    return _crc_impl(data, crc)


def warm_up() -> str:
    """Compile or load every kernel now (not in the middle of a downtime); returns the name."""
    probe = bytes(range(256)) * 32
    for impl in IMPLEMENTATIONS.values():
        # one specialisation per buffer kind the stream passes in
        for buf in (probe, bytearray(probe), memoryview(probe), memoryview(bytearray(probe))):
            impl(buf)
    crc32c_combine(1, 2, 3)
    return IMPLEMENTATION
