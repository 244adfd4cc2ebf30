"""The initramfs of the real-kernel tier: a newc cpio archive written in Python.

Contents: busybox (static) as /bin/busybox, our /init (native/kernel/init.sh), the
decompressed kernel modules under /lib/modules/ and /modules.list naming them in load order,
and a /dev/console node so PID 1 has a console before devtmpfs is mounted.

Written here rather than with the cpio tool because the host need not have one and the
format is tiny (the kernel's "initramfs buffer format", newc: ASCII-hex headers, 4-byte
alignment). The archive is left uncompressed: the kernel unpacks it at once and it is
only built when its inputs change.
"""

from __future__ import annotations

import lzma
import stat
from dataclasses import dataclass
from pathlib import Path

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


@dataclass
class CpioEntry:
    name: str          # path inside the archive, no leading "/"
    mode: int          # full st_mode (type bits + permissions)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class CpioWriter:
    """Collects entries and writes a newc archive; parents must be added before children."""

    def __init__(self) -> None:
        self._entries: list[CpioEntry] = []
        self._names: set[str] = set()

    def _add(self, entry: CpioEntry) -> None:
        name = entry.name.strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"cpio entry name {entry.name!r} is empty or climbs out of the root")
        if name in self._names:
            raise ValueError(f"cpio entry {name!r} added twice")
        parent = name.rpartition("/")[0]
        if parent and parent not in self._names:
            raise ValueError(f"cpio entry {name!r}: parent directory {parent!r} not added yet")
        entry.name = name
        self._names.add(name)
        self._entries.append(entry)

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._add(CpioEntry(name, stat.S_IFDIR | perm))

    def add_dirs(self, name: str) -> None:
        """Add ``name`` and every missing parent."""
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in self._names:
                self.add_dir(sub)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._add(CpioEntry(name, stat.S_IFREG | perm, data))

    def add_symlink(self, name: str, target: str) -> None:
        self._add(CpioEntry(name, stat.S_IFLNK | 0o777, target.encode()))

    def add_chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._add(CpioEntry(name, stat.S_IFCHR | perm, rdev=(major, minor)))

    def to_bytes(self) -> bytes:
        out = bytearray()
        for ino, e in enumerate([*self._entries, CpioEntry(_TRAILER, 0)], start=1):
            name = e.name.encode() + b"\0"
            nlink = 2 if stat.S_ISDIR(e.mode) else 1
            fields = (ino if e.name != _TRAILER else 0, e.mode, 0, 0, nlink, 0, len(e.data),
                      0, 0, e.rdev[0], e.rdev[1], len(name), 0)
            header = _MAGIC + b"".join(b"%08X" % f for f in fields)
            out += header + name + _pad4(len(header) + len(name))
            out += e.data + _pad4(len(e.data))
        return bytes(out)


def read_cpio(blob: bytes) -> list[CpioEntry]:
    """Parse a newc archive (used by the tests of this module and to inspect a cached one)."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if blob[pos:pos + 6] != _MAGIC:
            raise ValueError(f"cpio: bad magic at byte {pos}")
        f = [int(blob[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        pos += 110
        name = blob[pos:pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        data = blob[pos:pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == _TRAILER:
            return entries
        entries.append(CpioEntry(name, mode, data, (rmaj, rmin)))


def module_name(path: Path) -> str:
    """``vfio-pci.ko.xz`` -> ``vfio-pci.ko`` (the file name the module gets in the archive)."""
    name = path.name
    return name[: -len(".xz")] if name.endswith(".xz") else name


def module_bytes(path: Path) -> bytes:
    """A module file's contents, decompressed: busybox insmod cannot read .ko.xz."""
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def build_initramfs(busybox: Path, init_script: Path, modules: list[Path]) -> bytes:
    """The archive for ``modules`` (in load order) with ``busybox`` and ``init_script``."""
    w = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules"):
        w.add_dir(d)
    w.add_chardev("dev/console", 5, 1)
    w.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    w.add_symlink("bin/sh", "busybox")
    w.add_file("init", init_script.read_bytes(), 0o755)
    listed: list[str] = []
    for mod in modules:
        name = f"lib/modules/{module_name(mod)}"
        w.add_file(name, module_bytes(mod))
        listed.append("/" + name)
    w.add_file("modules.list", ("\n".join(listed) + "\n").encode())
    return w.to_bytes()
