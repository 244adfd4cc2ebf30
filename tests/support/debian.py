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


def package_versions(package: str) -> list[str]:
    """Every version of ``package`` the configured mirrors offer, as ``apt-cache show``
    lists them (newest first). Empty if the package is unknown."""
    for attempt in range(2):
        out = _apt_cache("show", package)
        found = re.findall(r"^Version: (\S+)$", out, flags=re.MULTILINE)
        if found:
            return found
        if attempt == 0:
            _refresh_lists_once()
    return []


def fetch_version(package: str, version: str) -> Path:
    """Like ``fetch`` for one exact ``version`` of ``package``: for packages whose name
    does not carry the version (``linux-source-6.12``), so the cache is keyed by it and a
    newer upload never serves a stale unpack. Returns the unpack root."""
    root = cache_dir() / "debs"
    root.mkdir(exist_ok=True)
    unpacked = root / f"{package}={version}"
    done = unpacked / ".unpacked"
    if done.exists():
        return unpacked
    # apt names the file with ':' (an epoch) spelled %3a.
    pattern = f"{package}_{version.replace(':', '%3a')}_*.deb"
    with _locked(f"{package}={version}"):
        if done.exists():
            return unpacked
        debs = list(root.glob(pattern))
        if not debs:
            res = _download(f"{package}={version}", root)
            if res.returncode != 0:
                _refresh_lists_once()
                res = _download(f"{package}={version}", root)
            debs = list(root.glob(pattern))
            if not debs:
                raise DebianFetchError(
                    f"apt-get download {package}={version} failed: "
                    f"{res.stderr.strip() or res.stdout.strip()}")
        if unpacked.exists():
            shutil.rmtree(unpacked)
        unpacked.mkdir()
        subprocess.run(["dpkg", "-x", str(debs[0]), str(unpacked)], check=True)
        done.touch()
    return unpacked
