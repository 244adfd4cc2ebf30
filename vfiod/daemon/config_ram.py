"""The RAM regions of a configured guest (``memory`` or ``[[guest.ram]]``), validated
for ``config.py`` (docs/architecture.md §6; ``from = "vmm"``: §8.1).

    [[guest.ram]]
    name = "ram"                         # default ram0, ram1 ...
    gpa = "0"                            # guest-physical address, page aligned
    size = "4GiB"
    path = "/dev/hugepages/g1"           # a shared file vfiod opens; absent: a new memfd
    from = "vmm"                         # or: the VMM hands the fd over with `attach`;
                                         # the guest is opened only then, and released
                                         # again by `detach`
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vfiod.daemon.config_toml import NAME, Table


@dataclass(frozen=True)
class RamConfig:
    name: str
    gpa: int
    size: int
    path: str | None = None        # a shared file (hugetlbfs, /dev/shm); None = a new memfd
    #: the VMM hands the region's fd over with ``attach`` (docs/architecture.md §8.1)
    from_vmm: bool = False


def parse_ram(t: Table, name: str, page: int, host_memory: int) -> tuple[RamConfig, ...]:
    """Guest ``name``'s regions from its table ``t``; the first error names the key."""
    ram: list[RamConfig] = []
    where: list[Table] = []
    if t.has("memory"):
        if t.has("ram"):
            raise t.error("memory", "give either memory (one region) or [[guest.ram]], "
                          "not both")
        ram.append(RamConfig("ram0", 0, int(t.size("memory", low=page, multiple_of=page)
                                            or 0)))
        where.append(t)
    for r in t.tables("ram"):
        where.append(r)
        ram.append(RamConfig(
            str(r.string("name", f"ram{len(ram)}", pattern=NAME)),
            int(r.size("gpa", 0, multiple_of=page) or 0),
            int(r.size("size", required=True, low=page, multiple_of=page) or 0),
            r.string("path"), r.string("from", pattern="vmm",
                                       hint='"vmm": the VMM hands the fd over') == "vmm"))
        if ram[-1].path is not None and not os.path.isabs(ram[-1].path or ""):
            raise r.error("path", "must be an absolute path")
        if ram[-1].path is not None and ram[-1].from_vmm:
            raise r.error("from", "give either path (vfiod opens the file) or from = "
                          '"vmm" (the VMM hands its fd over with attach), not both')
        r.finish()
    if not ram:
        raise t.error(None, f"guest {name} has no memory: add memory = \"4GiB\" or "
                      "[[guest.ram]] tables")
    total = 0
    for i, reg in enumerate(ram):
        total += reg.size
        if total > host_memory:
            key = "memory" if where[i] is t else "size"
            raise where[i].error(key, f"guest {name} would have {total} bytes of RAM, more "
                                 f"than this host's {host_memory} bytes")
    for i, reg in enumerate(ram):
        for other in ram[:i]:
            if other.name == reg.name:
                raise where[i].error("name", f"RAM region name {reg.name!r} is used twice")
            if reg.gpa < other.gpa + other.size and other.gpa < reg.gpa + reg.size:
                raise where[i].error("gpa", f"RAM region {reg.name} "
                                     f"[{reg.gpa:#x}, {reg.gpa + reg.size:#x}) overlaps "
                                     f"{other.name} [{other.gpa:#x}, "
                                     f"{other.gpa + other.size:#x})")
    return tuple(ram)
