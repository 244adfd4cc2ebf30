"""What the QEMU VM tier boots: the real-kernel tier's Debian kernel and a tiny initramfs
whose /init is our workload (native/qemu-guest/README.md).

The kernel is the one tests/kernel/assets.py resolves and caches (docs/testing.md "The
real-kernel tier"); only its vmlinuz is used, nothing there is rebuilt. The workload is
compiled here with ``gcc -static -O2`` and packed with the kernel tier's cpio writer
(tests/kernel/initramfs.py). Both are cached under ``$VFIOD_CACHE/qemu-guest/``, keyed by
a hash of workload.c and the compiler's version, so a warm run builds nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.kernel import assets as kernel_assets
from tests.kernel.initramfs import CpioWriter
from tests.support import debian

WORKLOAD_SOURCE = kernel_assets.REPO / "native" / "qemu-guest" / "workload.c"


class QemuAssetError(RuntimeError):
    """The kernel or the workload initramfs could not be had; says which step and why."""


@dataclass(frozen=True)
class QemuGuestAssets:
    vmlinuz: Path
    initramfs: Path
    release: str


def _compiler_version(gcc: str) -> str:
    res = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=False)
    return res.stdout.splitlines()[0] if res.returncode == 0 and res.stdout else gcc


def workload_key(gcc: str) -> str:
    """The cache key: workload.c and the compiler that builds it."""
    h = hashlib.sha256(WORKLOAD_SOURCE.read_bytes())
    h.update(_compiler_version(gcc).encode())
    return h.hexdigest()[:16]


def workload_initramfs_bytes(workload: bytes) -> bytes:
    """A newc archive with ``workload`` as /init and the nodes PID 1 needs before it
    mounts anything (/dev/console, the /proc and /dev mount points)."""
    w = CpioWriter()
    w.add_dir("dev")
    w.add_chardev("dev/console", 5, 1)
    w.add_dir("proc")
    w.add_file("init", workload, 0o755)
    return w.to_bytes()


def build_workload_initramfs() -> Path:
    """The cached initramfs, compiled and packed first if its key is new."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise QemuAssetError("gcc is not installed: the workload is compiled at test time "
                             "(apt-get install gcc libc6-dev)")
    base = debian.cache_dir() / "qemu-guest"
    work = base / f"workload-{workload_key(gcc)}"
    out = work / "initramfs.cpio"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        if work.exists():
            shutil.rmtree(work)              # a build that died half-way
        work.mkdir()
        binary = work / "workload"
        argv = [gcc, "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary),
                str(WORKLOAD_SOURCE)]
        res = subprocess.run(argv, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise QemuAssetError(f"compile the workload: {' '.join(argv)} exited "
                                 f"{res.returncode} (a static build needs libc6-dev's libc.a)"
                                 f"\n{res.stdout[-4000:]}{res.stderr[-4000:]}")
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(workload_initramfs_bytes(binary.read_bytes()))
        tmp.rename(out)
        for old in base.glob("workload-*"):
            if old != work:
                shutil.rmtree(old, ignore_errors=True)
    return out


def guest_kernel() -> tuple[str, Path]:
    """(release, vmlinuz) of the kernel tier's Debian kernel, fetched if not cached."""
    try:
        pkgs = kernel_assets.resolve_packages()
        vmlinuz = debian.fetch(pkgs.image) / "boot" / f"vmlinuz-{pkgs.release}"
    except (kernel_assets.AssetError, debian.DebianFetchError) as e:
        raise QemuAssetError(f"the Debian kernel the VM boots: {e}") from e
    if not vmlinuz.exists():
        raise QemuAssetError(f"{pkgs.image} has no {vmlinuz.name}")
    return pkgs.release, vmlinuz


def prepare_qemu_guest() -> QemuGuestAssets:
    release, vmlinuz = guest_kernel()
    return QemuGuestAssets(vmlinuz=vmlinuz, initramfs=build_workload_initramfs(),
                           release=release)
