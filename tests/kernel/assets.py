"""Everything the real-kernel tier boots, fetched and built on the host, cached.

docs/testing.md "The real-kernel tier": Debian's 6.12 kernel (newest build the mirror has), its
modules, headers + kbuild to build the ``mtty`` sample driver out of tree (from the
``linux-source-6.12`` of the same version; its code is never committed here) and our own
test device ``native/vfiod_dma`` (native/vfiod_dma/README.md), busybox and kmod. Nothing is installed on the host: packages are unpacked with ``dpkg -x``
(tests/support/debian.py).

Cache layout under ``$VFIOD_CACHE`` (default ``~/.cache/vfiod``)::

    debs/                      downloaded .deb files and their unpacked trees
    kernel-tier/<release>/     per kernel release (e.g. 6.12.117+deb12-amd64):
        kbuild/                headers + common + kbuild merged by hard links
        mtty-<src version>/    mtty.c and the built mtty.ko
        vfiod_dma-<src hash>/  native/vfiod_dma's sources and the built vfiod_dma.ko
        modroot/               modules + mtty.ko + vfiod_dma.ko, depmod'ed (--show-depends)
        initramfs-<key>.cpio   keyed by a hash of every input

Every key names package versions, so a warm run downloads and rebuilds nothing, and a new
kernel upload builds afresh beside the old one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.kernel.initramfs import build_initramfs
from tests.support import debian

REPO = Path(__file__).resolve().parents[2]
INIT_SCRIPT = REPO / "native" / "kernel" / "init.sh"
#: our own mdev test device (native/vfiod_dma/README.md): every file there is its source
NATIVE_DMA_DIR = REPO / "native" / "vfiod_dma"
NATIVE_DMA_SOURCES = ("Kbuild", "vfiod_dma.h", "core.c", "dma.c", "migration.c")

#: Modules the guest loads, by the names modprobe knows; their dependencies come along.
#: intel-iommu and virtio-pci are built into Debian's kernel.
GUEST_MODULES = ("vfio", "vfio_iommu_type1", "mdev", "vfio_pci",
                 "netfs", "9pnet", "9pnet_virtio", "9p", "overlay", "mtty",
                 "vfiod_dma")

#: linux-image-6.12.<n>+deb<m>-amd64-unsigned: the stock kernel without the signed-EFI
#: wrapper package (the same vmlinuz and modules).
IMAGE_PATTERN = (r"linux-image-" + debian.KERNEL_SERIES.replace(".", r"\.")
                 + r"\.[0-9]+\+deb[0-9]+-amd64-unsigned")


class AssetError(RuntimeError):
    """A step of preparing the guest failed; says which step and shows the tool's output."""


@dataclass
class Timings:
    """Wall-clock seconds per named part, in the order they happened (printed at the end
    of the session by tests/kernel/conftest.py)."""

    parts: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.monotonic() - t0

    def lines(self) -> list[str]:
        return [f"{name:<14} {secs:7.1f} s" for name, secs in self.parts.items()]


@dataclass(frozen=True)
class Packages:
    """The Debian package names (and the source version) one kernel release needs."""

    image: str
    headers: str
    common: str
    kbuild: str
    version: str           # Debian version of the image, e.g. 6.12.117-1~deb12u1
    release: str           # uname -r, e.g. 6.12.117+deb12-amd64

    @classmethod
    def for_image(cls, image: str, version: str) -> Packages:
        """Names of the companion packages of ``linux-image-<release>-unsigned``."""
        release = image.removeprefix("linux-image-").removesuffix("-unsigned")
        if release == image or not release.endswith("-amd64"):
            raise AssetError(f"unexpected kernel image package name {image!r}")
        abi = release.removesuffix("-amd64")
        return cls(image=image, headers=f"linux-headers-{release}",
                   common=f"linux-headers-{abi}-common", kbuild=f"linux-kbuild-{abi}",
                   version=version, release=release)


@dataclass(frozen=True)
class GuestAssets:
    release: str
    vmlinuz: Path
    initramfs: Path
    mtty_ko: Path
    native_dma_ko: Path
    headers_common: Path   # unpacked linux-headers-*-common (uAPI headers for the ABI check)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise builds of one cache entry between concurrent pytest processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _run(step: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise AssetError(f"{step}: {' '.join(argv)} exited {res.returncode}\n"
                         f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def resolve_packages() -> Packages:
    """The newest 6.12 amd64 unsigned kernel image the mirror offers, and its companions."""
    image = debian.newest_package(IMAGE_PATTERN)
    versions = debian.package_versions(image)
    if not versions:
        raise AssetError(f"apt-cache show {image} lists no version")
    return Packages.for_image(image, versions[0])


def _source_version(pkgs: Packages) -> str:
    """linux-source-6.12 of the image's own version, else the newest (mtty.c hardly moves
    within a stable series, and it is compiled against the image's headers either way)."""
    versions = debian.package_versions(f"linux-source-{debian.KERNEL_SERIES}")
    if not versions:
        raise AssetError(f"no linux-source-{debian.KERNEL_SERIES} package on the mirror")
    return pkgs.version if pkgs.version in versions else versions[0]


def _merge_kbuild(pkgs: Packages, dest: Path) -> Path:
    """headers + common + kbuild unpacked side by side as they would be installed, by hard
    links; returns the directory to run ``make -C`` in."""
    build_dir = dest / "usr" / "src" / f"linux-headers-{pkgs.release}"
    done = dest / ".merged"
    if done.exists():
        return build_dir
    if dest.exists():
        shutil.rmtree(dest)
    for pkg in (pkgs.headers, pkgs.common, pkgs.kbuild):
        shutil.copytree(debian.fetch(pkg) / "usr", dest / "usr", symlinks=True,
                        copy_function=os.link, dirs_exist_ok=True)
    # Pitfall (docs/testing.md): the arch headers' Makefile includes the -common tree by an
    # absolute /usr/src path; point it at our copy. Replace the file, not its hard-linked
    # content, so the unpacked package stays pristine.
    makefile = build_dir / "Makefile"
    common = dest / "usr" / "src" / pkgs.common
    makefile.unlink()
    makefile.write_text(f"include {common}/Makefile\n")
    done.touch()
    return build_dir


def build_mtty(kbuild_dir: Path, src_version: str, work: Path) -> Path:
    """``samples/vfio-mdev/mtty.c`` from linux-source, built against the image's headers."""
    ko = work / "mtty.ko"
    if ko.exists():
        return ko
    src = work / "mtty.c"
    if not src.exists():
        tarball = (debian.fetch_version(f"linux-source-{debian.KERNEL_SERIES}", src_version)
                   / "usr" / "src" / f"linux-source-{debian.KERNEL_SERIES}.tar.xz")
        member = f"linux-source-{debian.KERNEL_SERIES}/samples/vfio-mdev/mtty.c"
        with tarfile.open(tarball, "r:xz") as tar:
            f = None
            for info in tar:  # streaming: stop at the one member we need
                if info.name == member:
                    f = tar.extractfile(info)
                    break
            if f is None:
                raise AssetError(f"{tarball} has no {member}")
            work.mkdir(parents=True, exist_ok=True)
            src.with_suffix(".tmp").write_bytes(f.read())
            src.with_suffix(".tmp").rename(src)
    (work / "Kbuild").write_text("obj-m := mtty.o\n")
    # Pitfall (docs/testing.md): no pahole here, so no BTF for out-of-tree modules.
    _run("build mtty.ko", ["make", "-s", "-C", str(kbuild_dir), f"M={work}",
                           "CONFIG_DEBUG_INFO_BTF_MODULES=", "modules"])
    if not ko.exists():
        raise AssetError(f"build mtty.ko: make succeeded but {ko} is missing")
    return ko


def native_dma_key() -> str:
    """A hash of native/vfiod_dma's sources: an edit builds afresh beside the old build."""
    h = hashlib.sha256()
    for name in NATIVE_DMA_SOURCES:
        h.update(name.encode() + b"\0" + (NATIVE_DMA_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def build_native_dma(kbuild_dir: Path, base: Path) -> Path:
    """native/vfiod_dma built against the image's headers, cached by its source hash."""
    work = base / f"vfiod_dma-{native_dma_key()}"
    ko = work / "vfiod_dma.ko"
    if ko.exists():
        return ko
    if work.exists():
        shutil.rmtree(work)          # a build that died half-way
    work.mkdir(parents=True)
    for name in NATIVE_DMA_SOURCES:
        shutil.copy2(NATIVE_DMA_DIR / name, work / name)
    _run("build vfiod_dma.ko", ["make", "-s", "-C", str(kbuild_dir), f"M={work}",
                                "CONFIG_DEBUG_INFO_BTF_MODULES=", "W=1", "modules"])
    if not ko.exists():
        raise AssetError(f"build vfiod_dma.ko: make succeeded but {ko} is missing")
    for old in base.glob("vfiod_dma-*"):
        if old != work:
            shutil.rmtree(old, ignore_errors=True)
    return ko


def _kmod_tools(dest: Path) -> dict[str, Path]:
    """depmod/modprobe from the unpacked kmod package (kmod picks its personality from
    argv[0], so a symlink per name)."""
    kmod = debian.fetch("kmod") / "bin" / "kmod"
    dest.mkdir(parents=True, exist_ok=True)
    tools = {}
    for name in ("depmod", "modprobe"):
        link = dest / name
        if not link.is_symlink():
            link.symlink_to(kmod)
        tools[name] = link
    return tools


def module_load_order(modprobe: Path, modroot: Path, release: str,
                      names: tuple[str, ...]) -> list[Path]:
    """Module files of ``names`` and their dependencies in load order, each once."""
    order: list[Path] = []
    for name in names:
        res = _run(f"modprobe --show-depends {name}",
                   [str(modprobe), "-d", str(modroot), "-S", release, "--show-depends", name])
        order.extend(parse_show_depends(res.stdout))
    # a module shared by several names (vfio) is listed by each: load it once, first time
    return list(dict.fromkeys(order))


def parse_show_depends(text: str) -> list[Path]:
    """``insmod /path/mod.ko.xz [params]`` lines -> paths; ``builtin x`` lines are skipped."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] == "builtin":
            continue
        if words[0] != "insmod" or len(words) < 2:
            raise AssetError(f"modprobe --show-depends: unexpected line {line!r}")
        out.append(Path(words[1]))
    return out


def _modroot(pkgs: Packages, image_root: Path, extra: list[Path], base: Path,
             tools: dict[str, Path]) -> Path:
    """The image's modules plus ``extra`` (mtty.ko, vfiod_dma.ko) under extra/, with
    depmod's indexes."""
    modroot = base / "modroot"
    done = modroot / ".depmod"
    key = " ".join(ko.parent.name for ko in extra)
    if done.exists() and done.read_text() == key:
        return modroot
    if modroot.exists():
        shutil.rmtree(modroot)
    mods = modroot / "lib" / "modules" / pkgs.release
    shutil.copytree(image_root / "lib" / "modules" / pkgs.release, mods, symlinks=True,
                    copy_function=os.link)
    (mods / "extra").mkdir()
    for ko in extra:
        shutil.copy2(ko, mods / "extra" / ko.name)
    _run("depmod", [str(tools["depmod"]), "-b", str(modroot), pkgs.release])
    done.write_text(key)
    return modroot


def _initramfs(base: Path, busybox: Path, modules: list[Path], modroot: Path) -> Path:
    """The archive, rebuilt only when init.sh, busybox or a module changed."""
    h = hashlib.sha256()
    h.update(INIT_SCRIPT.read_bytes())
    h.update(busybox.read_bytes())
    for m in modules:
        h.update(str(m.relative_to(modroot)).encode())
        h.update(m.read_bytes())
    out = base / f"initramfs-{h.hexdigest()[:16]}.cpio"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(build_initramfs(busybox, INIT_SCRIPT, modules))
        tmp.rename(out)
        # an edited init.sh leaves its predecessors behind: keep only the current one
        for old in base.glob("initramfs-*.cpio"):
            if old != out:
                old.unlink(missing_ok=True)
    return out


def prepare(timings: Timings) -> GuestAssets:
    """Download (if not cached), build (if not cached) and return what the VM boots."""
    with timings.part("download"):
        pkgs = resolve_packages()
        src_version = _source_version(pkgs)
        image_root = debian.fetch(pkgs.image)
        for pkg in (pkgs.headers, pkgs.common, pkgs.kbuild, "busybox-static", "kmod"):
            debian.fetch(pkg)
        debian.fetch_version(f"linux-source-{debian.KERNEL_SERIES}", src_version)
    base = debian.cache_dir() / "kernel-tier" / pkgs.release
    with _locked(base / "build"):
        with timings.part("mtty build"):
            kbuild_dir = _merge_kbuild(pkgs, base / "kbuild")
            mtty_ko = build_mtty(kbuild_dir, src_version, base / f"mtty-{src_version}")
        with timings.part("vfiod_dma build"):
            native_ko = build_native_dma(kbuild_dir, base)
        with timings.part("initramfs"):
            tools = _kmod_tools(base / "kmod-bin")
            modroot = _modroot(pkgs, image_root, [mtty_ko, native_ko], base, tools)
            modules = module_load_order(tools["modprobe"], modroot, pkgs.release, GUEST_MODULES)
            busybox = debian.fetch("busybox-static") / "bin" / "busybox"
            initramfs = _initramfs(base, busybox, modules, modroot)
    vmlinuz = image_root / "boot" / f"vmlinuz-{pkgs.release}"
    if not vmlinuz.exists():
        raise AssetError(f"{pkgs.image} has no {vmlinuz.name}")
    return GuestAssets(release=pkgs.release, vmlinuz=vmlinuz, initramfs=initramfs,
                       mtty_ko=mtty_ko, native_dma_ko=native_ko,
                       headers_common=debian.fetch(pkgs.common) / "usr" / "src" / pkgs.common)
