"""What ``linux.py`` reads, parsed, and the paths it builds: pure code, no syscalls, so
the simulated kernel checks the same way (docs/kernel-contract.md §12 debugfs; memlock
facts for MAP_DMA, §3.7).
"""

from __future__ import annotations

import errno
import os
import resource

from vfiod.errors import KernelError
from vfiod.kernel.ops import MemlockFacts

_CAP_IPC_LOCK = 14    # bit of CapEff in /proc/self/status


def memlock_from_status(status: str, soft: int, hard: int) -> MemlockFacts:
    """``MemlockFacts`` from getrlimit's ``soft``/``hard`` and the text of
    ``/proc/self/status`` (``VmLck``: bytes locked; ``CapEff``: CAP_IPC_LOCK)."""
    locked, cap = 0, False
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "VmLck":
            parts = value.split()  # "  1234 kB"
            locked = int(parts[0]) * 1024 if parts else 0
        elif key == "CapEff":
            cap = bool(int(value.strip() or "0", 16) >> _CAP_IPC_LOCK & 1)

    def limit(v: int) -> int | None:
        return None if v == resource.RLIM_INFINITY or v < 0 else v

    return MemlockFacts(limit(soft), limit(hard), locked, cap)


def debugfs_path(root: str, relpath: str) -> str:
    """``relpath`` under ``root``; EINVAL for one that could leave it (absolute, ``..``,
    NUL): a device name from a configuration file becomes a path component here."""
    parts = [p for p in relpath.split("/") if p]
    if relpath.startswith("/") or "\0" in relpath or any(p in (".", "..") for p in parts):
        raise KernelError(errno.EINVAL, f"debugfs path {relpath!r}",
                          detail="must stay under the debugfs root")
    return os.path.join(root, *parts)
