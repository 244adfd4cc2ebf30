"""Fetch and unpack Debian packages at test time, cached outside the repository.

Used by the ABI tier (Linux 6.12 uAPI headers) and the real-kernel tier (kernel image,
modules, kernel source for the mtty sample, busybox, kmod). Packages are downloaded with
``apt-get download`` (the machine's configured Debian mirror; no host is named here) and
unpacked with ``dpkg -x`` — never installed on the host. A warm cache downloads nothing.

Cache directory: ``$VFIOD_CACHE`` or ``~/.cache/vfiod``.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

#: The kernel series the real-kernel tier and the newer-ABI check pin.
KERNEL_SERIES = "6.12"


def cache_dir() -> Path:
    root = Path(os.environ.get("VFIOD_CACHE", Path.home() / ".cache" / "vfiod"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _locked(name: str):
    """Serialise downloads between concurrent test processes (xdist, two runs)."""
    lock = cache_dir() / f".{name}.lock"
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class DebianFetchError(RuntimeError):
    """A package could not be found or downloaded; says which and what apt said."""


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, check=False)


def _apt_cache(*args: str) -> str:
    out = subprocess.run(["apt-cache", *args], capture_output=True, text=True, check=False)
    return out.stdout


def _download(package: str, into: Path) -> subprocess.CompletedProcess[str]:
    # apt-get download writes into its working directory.
    return subprocess.run(["apt-get", "download", "-q", package], capture_output=True, text=True,
                          check=False, cwd=into)


_lists_refreshed = False


def _refresh_lists_once() -> None:
    global _lists_refreshed
    if not _lists_refreshed:
        _apt("update", "-qq")
        _lists_refreshed = True


def newest_package(pattern: str) -> str:
    """The newest package name matching the regex ``pattern`` (anchored), e.g.
    ``linux-headers-6\\.12\\.[0-9.]+\\+deb12-common``. Versions compare numerically."""
    for attempt in range(2):
        names = _apt_cache("pkgnames").split()
        found = [n for n in names if re.fullmatch(pattern, n)]
        if found:
            def key(n: str) -> list[int]:
                return [int(x) for x in re.findall(r"\d+", n)]
            return max(found, key=key)
        if attempt == 0:
            _refresh_lists_once()
    raise DebianFetchError(f"no Debian package matches {pattern!r} (after apt-get update)")


def fetch(package: str) -> Path:
    """Download ``package`` (if not cached) and unpack it; returns the unpack root."""
    root = cache_dir() / "debs"
    root.mkdir(exist_ok=True)
    unpacked = root / package
    done = unpacked / ".unpacked"
    if done.exists():
        return unpacked
    with _locked(package):
        if done.exists():
            return unpacked
        debs = list(root.glob(f"{package}_*.deb"))
        if not debs:
            res = _download(package, root)
            if res.returncode != 0:
                _refresh_lists_once()
                res = _download(package, root)
            debs = list(root.glob(f"{package}_*.deb"))
            if not debs:
                raise DebianFetchError(
                    f"apt-get download {package} failed: {res.stderr.strip() or res.stdout.strip()}")
        if unpacked.exists():
            shutil.rmtree(unpacked)
        unpacked.mkdir()
        subprocess.run(["dpkg", "-x", str(debs[0]), str(unpacked)], check=True)
        done.touch()
    return unpacked
