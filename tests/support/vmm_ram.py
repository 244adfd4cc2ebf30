"""A small "VMM" for the hand-over tests (docs/architecture.md §8.1): guest RAM in a memfd
it owns, filled with a pattern, handed to a daemon with ``attach`` over the control
socket (SCM_RIGHTS), and a look into the daemon's fd table to see what it holds.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from tests.support.daemons import DaemonProcess

MIB = 1 << 20


class VmmRam:
    """One memfd named ``name`` of ``size`` bytes; ``fill`` writes a per-page pattern."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.size = size

    def fill(self, seed: int) -> None:
        with mmap.mmap(self.fd, self.size) as m:
            for page in range(0, self.size, 4096):
                m[page:page + 16] = (seed * 1_000_003 + page).to_bytes(16, "little")
            m[self.size - 5:] = b"last!"

    def content(self) -> bytes:
        return os.pread(self.fd, self.size, 0)

    def close(self) -> None:
        os.close(self.fd)


def layout(region: str, gpa: int, size: int, offset: int = 0, fd: int = 0) -> dict:
    return {"region": region, "gpa": gpa, "size": size, "offset": offset, "fd": fd}


def memfd_fds(pid: int, name: str) -> list[str]:
    """Process ``pid``'s fds on memfd ``name`` ("fd N" each)."""
    out = []
    for link in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(link)
        except OSError:
            continue                 # closed while listing
        if target.startswith(f"/memfd:{name} "):
            out.append(f"fd {link.name}")
    return out


def held_memfds(d: DaemonProcess, name: str) -> list[str]:
    """The daemon's fds and mappings of memfd ``name`` (what it still holds of it)."""
    proc = Path(f"/proc/{d.proc.pid}")
    return memfd_fds(d.proc.pid, name) + [
        line for line in (proc / "maps").read_text().splitlines() if f"/memfd:{name} " in line]
