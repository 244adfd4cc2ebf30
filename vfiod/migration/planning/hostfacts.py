"""Facts about a host that decide whether a guest may migrate to it (docs/architecture.md §1 preflight).

Gatherers, each reading paths given as parameters (through ``KernelOps.read_text``) so
tests feed files:

* ``cpu_facts(cpuinfo_text)``: vendor, model, the CPU flags common to every processor,
  and the x86-64 micro-architecture ABI level (baseline, v2, v3, v4) they reach.
* ``sev_facts(cpu, ops, sys_root)``: whether the CPU and KVM offer AMD SEV / SEV-ES
  (``/sys/module/kvm_amd/parameters/sev``, ``sev_es``). Informative: the refusal is made
  from the *guest's* encryption flag (``preflight.compare``).
* ``memlock``: ``KernelOps.memlock`` (RLIMIT_MEMLOCK, bytes already locked, CAP_IPC_LOCK;
  the simulated kernel answers with its own limit).
* ``gather_host_facts(...)``: all of them plus page size and host name.

The ABI levels are data (``X86_64_LEVELS``), the feature lists QEMU uses for its CPU models'
ABI compatibility table (``scripts/cpu-x86-uarch-abi.py``), written with /proc/cpuinfo's
flag names (``lahf-lm`` → ``lahf_lm``, ``sse4.1`` → ``sse4_1``, SSE3 is ``pni``, LZCNT is
``abm``). The psABI also lists OSXSAVE for v3; Linux does not print that bit, and it clears
``avx`` when the OS does not enable XSAVE, so ``avx`` stands for it.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
from dataclasses import dataclass

from vfiod.errors import KernelError
from vfiod.kernel.ops import KernelOps, MemlockFacts

X86_64_LEVELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("x86-64", frozenset({"cmov", "cx8", "fpu", "fxsr", "mmx", "syscall", "sse", "sse2"})),
    ("x86-64-v2", frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2",
                             "ssse3"})),
    ("x86-64-v3", frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"})),
    ("x86-64-v4", frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})),
)


class AbiLevel(enum.IntEnum):
    NONE = 0       # not x86-64, or below the baseline
    BASELINE = 1   # x86-64
    V2 = 2
    V3 = 3
    V4 = 4

    @property
    def label(self) -> str:
        return "not x86-64" if self == AbiLevel.NONE else X86_64_LEVELS[self - 1][0]


def abi_level(flags: frozenset[str]) -> AbiLevel:
    """The highest level whose features, and those of every level below, are all present."""
    level = 0
    for _, needed in X86_64_LEVELS:
        if not needed <= flags:
            break
        level += 1
    return AbiLevel(level)


def flags_up_to(level: AbiLevel) -> frozenset[str]:
    out: set[str] = set()
    for _, needed in X86_64_LEVELS[:level]:
        out |= needed
    return frozenset(out)


@dataclass(frozen=True)
class CpuFacts:
    vendor: str
    model: str
    flags: frozenset[str]
    abi_level: AbiLevel


@dataclass(frozen=True)
class SevFacts:
    cpu_sev: bool
    cpu_sev_es: bool
    kvm_sev: bool | None      # None: kvm_amd not loaded (no parameter file)
    kvm_sev_es: bool | None

    @property
    def host_offers_sev(self) -> bool:
        return bool(self.cpu_sev and self.kvm_sev)


@dataclass(frozen=True)
class HostFacts:
    hostname: str
    cpu: CpuFacts
    sev: SevFacts
    memlock: MemlockFacts
    page_size: int


def cpu_facts(cpuinfo_text: str) -> CpuFacts:
    """Parse /proc/cpuinfo text; flags are those every listed processor has."""
    vendor = model = ""
    common: set[str] | None = None
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "model name" and not model:
            model = value.strip()
        elif key == "flags":
            flags = set(value.split())
            common = flags if common is None else common & flags
    fl = frozenset(common or ())
    return CpuFacts(vendor, model, fl, abi_level(fl))


def _read(ops: KernelOps, path: str) -> str | None:
    try:
        return ops.read_text(path)
    except KernelError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise


def _yes(text: str | None) -> bool | None:
    if text is None:
        return None
    return text.strip() in ("Y", "y", "1")


def sev_facts(cpu: CpuFacts, ops: KernelOps, sys_root: str = "/sys") -> SevFacts:
    params = os.path.join(sys_root, "module/kvm_amd/parameters")
    return SevFacts("sev" in cpu.flags, "sev_es" in cpu.flags,
                    _yes(_read(ops, os.path.join(params, "sev"))),
                    _yes(_read(ops, os.path.join(params, "sev_es"))))


def gather_host_facts(ops: KernelOps, *, cpuinfo: str = "/proc/cpuinfo", sys_root: str = "/sys",
                      page_size: int | None = None, hostname: str | None = None) -> HostFacts:
    text = _read(ops, cpuinfo)
    if text is None:
        raise KernelError(errno.ENOENT, f"read({cpuinfo})", detail="no CPU information")
    cpu = cpu_facts(text)
    return HostFacts(
        hostname=hostname or socket.gethostname(),
        cpu=cpu,
        sev=sev_facts(cpu, ops, sys_root),
        memlock=ops.memlock(),
        page_size=page_size or os.sysconf("SC_PAGE_SIZE"),
    )
