"""Build and run native/abi_probe.c against a set of kernel headers (the ABI tier,
docs/testing.md; docs/kernel-contract.md §0 - §7). Reused by the real-kernel tier with the guest's headers.

``build_and_run(include_dirs, extra_cflags)`` compiles the probe with gcc in a temporary
directory (never in the repository), runs it and returns its JSON as a dict. Any failure
(no gcc, a compile error, a crash, bad JSON) raises ProbeError with gcc's own words.

Header sets used by tests/abi:
* ``system_headers()``: /usr/include as installed (Debian bookworm: 6.1, no iommufd.h).
* ``uapi_headers(root, into)``: raw include/uapi/linux/{vfio,iommufd}.h from an unpacked
  ``linux-headers-*-common`` package, copied into ``into/linux/`` and compiled ahead of
  the system headers with ``-D__user=`` (docs/testing.md "Checking ctypes layouts ...").
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE_SOURCE = REPO / "native" / "abi_probe.c"
CFLAGS = ["-std=gnu11", "-O0", "-Wall", "-Wextra", "-Werror"]


class ProbeError(RuntimeError):
    """The probe could not be built or run; the message says which step and why."""


def build_and_run(include_dirs: list[Path], extra_cflags: list[str]) -> dict[str, object]:
    """Compile native/abi_probe.c with ``-I`` for each of ``include_dirs`` (searched
    before the system headers, in order) plus ``extra_cflags``; run it; return its JSON."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ProbeError("gcc not found on PATH: the ABI tier needs gcc to compile "
                         f"{PROBE_SOURCE} (apt-get install gcc)")
    if not PROBE_SOURCE.is_file():
        raise ProbeError(f"probe source missing: {PROBE_SOURCE}")
    with tempfile.TemporaryDirectory(prefix="vfiod-abi-probe-") as tmp:
        exe = Path(tmp) / "abi_probe"
        cmd = [gcc, *CFLAGS, *(f"-I{d}" for d in include_dirs), *extra_cflags,
               "-o", str(exe), str(PROBE_SOURCE)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise ProbeError(f"compiling the ABI probe failed ({' '.join(cmd)}):\n"
                             f"{res.stderr.strip()}")
        run = subprocess.run([str(exe)], capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise ProbeError(f"the ABI probe exited with {run.returncode}: {run.stderr.strip()}")
    try:
        data = json.loads(run.stdout)
    except json.JSONDecodeError as exc:
        raise ProbeError(f"the ABI probe printed invalid JSON ({exc}):\n{run.stdout[:500]}") \
            from exc
    if not isinstance(data, dict):
        raise ProbeError(f"the ABI probe printed {type(data).__name__}, not a JSON object")
    return data


@dataclass(frozen=True)
class HeaderSet:
    """One set of kernel headers to check against: a name for test ids and messages, the
    uAPI version it represents (for "arrived in release X" entries), and the flags."""

    name: str
    version: tuple[int, int]
    include_dirs: list[Path] = field(default_factory=list)
    extra_cflags: list[str] = field(default_factory=list)

    def probe(self) -> dict[str, object]:
        return build_and_run(self.include_dirs, self.extra_cflags)


def system_headers(usr_include: Path = Path("/usr/include")) -> HeaderSet:
    """The installed headers; the version comes from their <linux/version.h>."""
    version_h = usr_include / "linux" / "version.h"
    vfio_h = usr_include / "linux" / "vfio.h"
    if not vfio_h.is_file() or not version_h.is_file():
        raise ProbeError(f"{vfio_h} or {version_h} missing: install linux-libc-dev")
    text = version_h.read_text()
    major = re.search(r"#define LINUX_VERSION_MAJOR (\d+)", text)
    minor = re.search(r"#define LINUX_VERSION_PATCHLEVEL (\d+)", text)
    if major and minor:
        version = (int(major.group(1)), int(minor.group(1)))
    else:
        code = re.search(r"#define LINUX_VERSION_CODE (\d+)", text)
        if code is None:
            raise ProbeError(f"{version_h} has no LINUX_VERSION_CODE")
        version = (int(code.group(1)) >> 16, (int(code.group(1)) >> 8) & 0xFF)
    return HeaderSet(f"system-{version[0]}.{version[1]}", version)


def uapi_headers(package_root: Path, into: Path) -> HeaderSet:
    """A header set from an unpacked ``linux-headers-<ver>-common`` Debian package:
    copies include/uapi/linux/{vfio.h,iommufd.h} to ``into/linux/`` (iommufd.h only if
    the package has it)."""
    found = sorted(package_root.glob("usr/src/linux-headers-*/include/uapi/linux/vfio.h"))
    if not found:
        raise ProbeError(f"no include/uapi/linux/vfio.h under {package_root}")
    uapi = found[0].parent
    m = re.search(r"linux-headers-(\d+)\.(\d+)", str(uapi))
    if m is None:
        raise ProbeError(f"cannot tell the kernel version from {uapi}")
    version = (int(m.group(1)), int(m.group(2)))
    dest = into / "linux"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("vfio.h", "iommufd.h"):
        if (uapi / name).is_file():
            shutil.copyfile(uapi / name, dest / name)
    return HeaderSet(f"uapi-{version[0]}.{version[1]}", version, [into], ["-D__user="])
