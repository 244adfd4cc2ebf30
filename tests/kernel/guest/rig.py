"""The guest's test environment: checks that it is what the tests need, and the sysfs
set-up that is not vfiod's job (creating mtty mdevs, binding edu to vfio-pci).

Runs only inside the QEMU guest of the real-kernel tier (testing.md; vfio-uapi.md §9.1,
§9.2). Every missing piece fails with what is missing and what would provide it, never a
skip: a guest that lacks a module is a broken rig, not an optional feature.

VFIO itself is driven only through vfiod (``vfiod.vfio`` over ``LinuxKernel``); the plain
file writes here are the administrator's side (sysfs), as a host operator would do them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import vfiod.abi.vfio as v
from vfiod.kernel.ops import KernelOps
from vfiod.vfio import Device

REPO = Path(__file__).resolve().parents[3]
SYS = Path("/sys")
DEV = Path("/dev")
#: The writable results share (native/kernel/init.sh mounts it here).
RESULTS = Path(os.environ.get("VFIOD_GUEST_RESULTS", "/vfiod-results"))

#: QEMU's "edu" educational PCI device (-device edu).
EDU_VENDOR, EDU_DEVICE = 0x1234, 0x11E8
#: mtty's emulated PCI identity (config space dword 0: device << 16 | vendor).
MTTY_VENDOR, MTTY_DEVICE = 0x4348, 0x3253
MTTY_PARENT = SYS / "class" / "mdev_bus" / "mtty"


def insmod_failures() -> str:
    """What init.sh recorded about modules that did not load (empty if none)."""
    log = RESULTS / "insmod-failures.log"
    return log.read_text().strip() if log.exists() else ""


def require_module(name: str) -> None:
    """Fail naming ``name`` unless the module is loaded (or built in)."""
    if (SYS / "module" / name).is_dir():
        return
    failures = insmod_failures()
    why = f"; init.sh recorded:\n{failures}" if failures else \
        " and init.sh recorded no insmod failure (is it in tests/kernel/assets.GUEST_MODULES?)"
    pytest.fail(f"kernel module {name!r} is not loaded in the guest{why}", pytrace=False)


def require_char_device(path: Path, what: str) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        pytest.fail(f"{path} is missing: {what}", pytrace=False)
    if not stat.S_ISCHR(mode):
        pytest.fail(f"{path} exists but is not a character device: {what}", pytrace=False)


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# -- mtty mdevs (vfio-uapi.md §9.1) ---------------------------------------------------------

def mtty_type_dir(type_name: str) -> Path:
    require_module("mtty")
    d = MTTY_PARENT / "mdev_supported_types" / type_name
    if not d.is_dir():
        have = sorted(p.name for p in (MTTY_PARENT / "mdev_supported_types").glob("*"))
        pytest.fail(f"mtty offers no mdev type {type_name!r} (has {have})", pytrace=False)
    return d


@contextmanager
def mtty_mdev(type_name: str = "mtty-2") -> Iterator[str]:
    """Create an mtty mdev of ``type_name`` through sysfs; remove it afterwards."""
    d = mtty_type_dir(type_name)
    name = str(uuid.uuid4())
    try:
        _write(d / "create", name)
    except OSError as e:
        pytest.fail(f"creating an {type_name} mdev via {d / 'create'} failed: {e}",
                    pytrace=False)
    try:
        yield name
    finally:
        remove = SYS / "bus" / "mdev" / "devices" / name / "remove"
        if remove.exists():
            _write(remove, "1")


# -- edu behind the emulated intel-iommu, bound to vfio-pci (vfio-uapi.md §9.2) -------------

def find_pci(vendor: int, device: int) -> list[str]:
    out = []
    for dev in sorted((SYS / "bus" / "pci" / "devices").iterdir()):
        try:
            if (int((dev / "vendor").read_text(), 16) == vendor
                    and int((dev / "device").read_text(), 16) == device):
                out.append(dev.name)
        except (OSError, ValueError):
            continue
    return out


def bind_vfio_pci(bdf: str) -> None:
    """driver_override + drivers_probe: the administrator's way to hand a device to VFIO."""
    require_module("vfio_pci")
    dev = SYS / "bus" / "pci" / "devices" / bdf
    driver = dev / "driver"
    if driver.is_symlink():
        current = os.path.basename(os.readlink(driver))
        if current == "vfio-pci":
            return
        _write(driver / "unbind", bdf)
    _write(dev / "driver_override", "vfio-pci")
    _write(SYS / "bus" / "pci" / "drivers_probe", bdf)
    if not driver.is_symlink() or os.path.basename(os.readlink(driver)) != "vfio-pci":
        pytest.fail(f"{bdf} did not bind to vfio-pci (is the intel-iommu active? "
                    f"/sys/class/iommu has {sorted(os.listdir(SYS / 'class' / 'iommu'))})",
                    pytrace=False)


def edu_bdf() -> str:
    found = find_pci(EDU_VENDOR, EDU_DEVICE)
    if len(found) != 1:
        pytest.fail(f"expected one QEMU edu device ({EDU_VENDOR:04x}:{EDU_DEVICE:04x}), "
                    f"found {found}: is '-device edu' on the QEMU command line?",
                    pytrace=False)
    return found[0]


# -- loopback networking (the TCP migration tests) ------------------------------------------

IFF_UP = 0x1


def loopback_up() -> None:
    """Bring ``lo`` up: init.sh configures no network, and the kernel creates ``lo`` down
    (127.0.0.1 then answers ENETUNREACH). An administrator's step, done with pyroute2."""
    flags = SYS / "class" / "net" / "lo" / "flags"
    if int(flags.read_text(), 16) & IFF_UP:
        return
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    if not int(flags.read_text(), 16) & IFF_UP:
        pytest.fail("could not bring the loopback interface up", pytrace=False)


# -- guest memory to map for DMA ----------------------------------------------------------

class GuestRam:
    """A shared memory file mapped into this process, as a VMM's guest RAM would be: the
    ``vaddr`` vfiod hands to VFIO_IOMMU_MAP_DMA. Made through ``KernelOps``."""

    def __init__(self, kernel: KernelOps, size: int) -> None:
        self.kernel = kernel
        self.size = size
        self.fd = kernel.memfd_create("vfiod-guest-ram", size)
        self.mm = kernel.mmap(self.fd, size)
        self._anchor: ctypes.Array[ctypes.c_char] | None = \
            (ctypes.c_char * size).from_buffer(self.mm)
        self.vaddr = ctypes.addressof(self._anchor)

    def close(self) -> None:
        self._anchor = None     # drop the exported pointer so the mapping can close
        self.mm.close()
        self.kernel.close(self.fd)

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- mtty's UART registers, the device state a migration must carry (vfio-uapi.md §9.1) ----

#: 16550 register offsets inside each port's 8-byte BAR (port n = BAR n)
UART_RX = UART_TX = 0
UART_IER, UART_IIR, UART_FCR, UART_LCR, UART_MCR, UART_LSR, UART_MSR, UART_SCR = \
    1, 2, 2, 3, 4, 5, 6, 7
UART_LSR_DR = 0x01
#: FCR: enable the FIFO and clear both directions (mtty empties its loop-back FIFO)
UART_FCR_RESET_FIFO = 0x07
#: registers whose read has no side effect (RX pops the FIFO; IIR/LSR are computed)
SNAPSHOT_REGS = {"IER": UART_IER, "IIR": UART_IIR, "LCR": UART_LCR, "MCR": UART_MCR,
                 "LSR": UART_LSR, "MSR": UART_MSR, "SCR": UART_SCR}
MTTY_HEADER_BYTES = 24
MTTY_PORT_BYTES = 36


@dataclass(frozen=True)
class UartProgram:
    """What ``Uart.program`` wrote into one port: register values and FIFO bytes."""

    lcr: int
    ier: int
    mcr: int
    scr: int
    fifo: bytes


class Uart:
    """mtty's two 16550 ports, reached through vfiod's ``Device`` region access (BAR n is
    port n), the way a guest driver would program them. mtty keeps this state in the
    mdev, across device opens and resets, so every test programs it afresh."""

    def __init__(self, device: Device, ports: int = 2) -> None:
        self.device = device
        self.ports = ports

    def _bar(self, port: int) -> int:
        if not 0 <= port < self.ports:
            raise ValueError(f"mtty port {port} does not exist (0..{self.ports - 1})")
        return v.VFIO_PCI_BAR0_REGION_INDEX + port

    def write(self, port: int, reg: int, value: int) -> None:
        self.device.write_region(self._bar(port), reg, bytes([value]))

    def read(self, port: int, reg: int) -> int:
        return self.device.read_region(self._bar(port), reg, 1)[0]

    def snapshot(self) -> dict[str, int]:
        """Every side-effect-free register of every port, e.g. ``{"p0.SCR": 0x5a, ...}``."""
        return {f"p{p}.{name}": self.read(p, reg)
                for p in range(self.ports) for name, reg in SNAPSHOT_REGS.items()}

    def drain(self, port: int, limit: int = 64) -> bytes:
        """Pop the loop-back FIFO until the line status says it is empty."""
        out = bytearray()
        while self.read(port, UART_LSR) & UART_LSR_DR:
            if len(out) >= limit:
                raise AssertionError(f"mtty port {port}: FIFO still not empty after "
                                     f"{limit} reads")
            out.append(self.read(port, UART_RX))
        return bytes(out)

    def clear(self) -> None:
        """Every port back to a blank state (empty FIFO, registers 0)."""
        for p in range(self.ports):
            self.write(p, UART_LCR, 0)          # DLAB off: TX/IER are registers again
            self.write(p, UART_FCR, UART_FCR_RESET_FIFO)
            for reg in (UART_IER, UART_MCR, UART_SCR):
                self.write(p, reg, 0)

    def program(self, seed: int) -> list[UartProgram]:
        """A state unique to ``seed`` on every port: line/modem/interrupt-enable/scratch
        registers and a few bytes queued in the FIFO (IRQs are not set up, so mtty's
        interrupt triggers do nothing)."""
        self.clear()
        progs = []
        for p in range(self.ports):
            s = (seed * 31 + p * 7) & 0xFF
            prog = UartProgram(lcr=0x03 | ((s & 0x7) << 3), ier=s & 0x0F, mcr=(s >> 4) & 0x1F,
                               scr=s ^ 0xA5, fifo=bytes((s + i) & 0xFF for i in range(3 + p)))
            self.write(p, UART_LCR, prog.lcr)   # no DLAB bit: TX still feeds the FIFO
            self.write(p, UART_IER, prog.ier)
            self.write(p, UART_MCR, prog.mcr)
            self.write(p, UART_SCR, prog.scr)
            for b in prog.fifo:
                self.write(p, UART_TX, b)
            progs.append(prog)
        return progs


def mtty_port_records(stream: bytes) -> bytes:
    """The per-port part of an mtty migration stream (after the 24-byte header)."""
    return stream[MTTY_HEADER_BYTES:]


# -- numba in the guest (testing.md "The real-kernel tier") --------------------------------
#
# numba keys its cache by the CPU it compiled for, and the guest's TCG CPU ("k8-sse3" with
# AVX2 under QEMU 7.2) is not the host's, so the host's ordinary cache never hits there;
# compiling under TCG takes 20-80 s per kernel. So the host compiles what the guest tests
# run for numba's portable target ("generic", no CPU features) into GUEST_NUMBA_CACHE
# before booting (``warm_guest_numba_cache``), and the guest loads from there with the
# same target (``guest_numba_env``, applied by conftest.py before numba is imported). The
# guest sees the host root read-only under a tmpfs overlay: numba can still write, and
# what it writes is lost, which is fine. With "generic" the CRC-32C stream checksum uses
# its table kernel (crc32c._sse42_usable), identically on both sides.

GUEST_NUMBA_CACHE = REPO / ".cache" / "numba-guest"
#: written by ``warm_guest_numba_cache`` once the cache holds everything
GUEST_NUMBA_STAMP = GUEST_NUMBA_CACHE / "warmed"
#: written instead when the warm-up failed: its output, for the guest tests to show
GUEST_NUMBA_FAILED = GUEST_NUMBA_CACHE / "warm-up-failed.log"


def guest_numba_env() -> dict[str, str]:
    # NUMBA_CPU_NAME=generic makes numba default NUMBA_CPU_FEATURES to "" (portable)
    return {"NUMBA_CACHE_DIR": str(GUEST_NUMBA_CACHE), "NUMBA_CPU_NAME": "generic"}


def warm_guest_numba_cache(timeout: float = 900.0) -> float:
    """Host side, before boot: compile (or just load, when cached) every numba kernel
    the guest tests use into GUEST_NUMBA_CACHE, in a subprocess so this process's numba
    keeps its own target. Returns the seconds it took. A failure does not raise: the
    guest tests that need the cache fail with its output (``guest_numba_ready``)."""
    t0 = time.monotonic()
    GUEST_NUMBA_CACHE.mkdir(parents=True, exist_ok=True)
    GUEST_NUMBA_STAMP.unlink(missing_ok=True)
    GUEST_NUMBA_FAILED.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), **guest_numba_env())
    argv = [sys.executable, "-c", "from tests.kernel.guest import rig; "
            "rig._exercise_numba_paths()"]
    try:
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        failed = (f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
                  if proc.returncode else "")
    except subprocess.TimeoutExpired:
        failed = f"did not finish within {timeout:.0f} s"
    if failed:
        GUEST_NUMBA_FAILED.write_text(failed)
    else:
        GUEST_NUMBA_STAMP.write_text(f"{time.time():.0f}\n")
    return time.monotonic() - t0


def guest_numba_ready() -> str | None:
    """None if the host warmed the guest's numba cache since the kernels last changed,
    else what is missing."""
    fix = ("the host must run tests.kernel.guest.rig.warm_guest_numba_cache() before "
           "booting the guest (compiling numba kernels under TCG takes minutes)")
    if GUEST_NUMBA_FAILED.exists():
        return (f"the host's warm-up of the guest's numba cache failed "
                f"({GUEST_NUMBA_FAILED}):\n{GUEST_NUMBA_FAILED.read_text()[-3000:]}")
    if not GUEST_NUMBA_STAMP.exists():
        return f"{GUEST_NUMBA_STAMP} is missing: {fix}"
    stamp = GUEST_NUMBA_STAMP.stat().st_mtime
    # numba invalidates a cached kernel when the file defining it changes
    newer = [str(p.relative_to(REPO)) for d in ("vfiod/dirty", "vfiod/migration/stream")
             for p in (REPO / d).glob("*.py")
             if p.stat().st_mtime > stamp and "numba" in p.read_text()]
    if newer:
        return f"{GUEST_NUMBA_STAMP} is older than {', '.join(sorted(newer))}: {fix}"
    return None


def _exercise_numba_paths() -> None:
    """Run, on the simulated kernel, the vfiod code paths the guest tests take through
    numba, so each kernel is compiled for the argument types they really pass."""
    from vfiod.dirty import bitmap_kernels as k
    from vfiod.dirty.global_bitmap import GlobalBitmap
    from vfiod.dirty.providers.base import DmaSpace
    from vfiod.dirty.tracker import DirtyTracker
    from vfiod.dirty.tracker_layout import GuestRegion, IovaMapping, TrackedContainer
    from vfiod.kernel.sim import SimHost
    from vfiod.kernel.sim.interfaces import DeviceSpec
    from vfiod.migration.stream import crc32c
    from vfiod.migration.stream.pagecrc import page_crcs
    from vfiod.vfio import Container, Group, HostPaths

    crc32c.warm_up()
    with mmap.mmap(-1, 4 * 4096) as mm:       # the stream hashes views of guest RAM mmaps
        page_crcs(memoryview(mm), 4096)
        page_crcs(memoryview(mm)[4096:], 4096)
    words = np.zeros(4, dtype=np.uint64)
    k.set_range(words, 3, 100)
    k.popcount(words, 200)
    # a run longer than max_run is cut (_k_split_runs): a first pass over a guest of more
    # than max_run_pages (1024) dirty pages in a row, as the daemon tests migrate
    k.dirty_runs(words, 200, 64)
    k.test_and_clear(words, 0, 200)
    k.dirty_runs(words, 200, 64)
    GlobalBitmap(256).mark_all()
    mdev, pci = "5c3b1c1e-0000-4000-8000-00000000c0de", "0000:00:03.0"
    with tempfile.TemporaryDirectory() as root:
        host = SimHost.build(root, [[DeviceSpec(mdev, kind="mdev", dma_logging=True,
                                              mig_flags=v.VFIO_MIGRATION_STOP_COPY)],
                                    [DeviceSpec(pci, migration="none")]])
        paths = HostPaths(host.sysfs_root, host.dev_root)
        try:
            with GuestRam(host.kernel, 64 * 4096) as ram:
                spaces = []
                for name in (mdev, pci):
                    c = Container.open(host.kernel, paths)
                    g = Group.open(host.kernel, paths, host.group_of(name))
                    g.set_container(c)
                    c.set_iommu()
                    spaces.append((c, DmaSpace(name, [g.get_device(name)], type1=c)))
                tracked = []
                for i, (c, space) in enumerate(spaces):
                    iova = 0x10_0000_0000 + i * 0x1000_0000
                    c.map_dma(iova, ram.vaddr + 4096, 37 * 4096)
                    c.map_dma(iova + 37 * 4096, ram.vaddr + 40 * 4096, 20 * 4096)
                    tracked.append(TrackedContainer(space, [IovaMapping(iova, 37 * 4096, 4096),
                                   IovaMapping(iova + 37 * 4096, 20 * 4096, 40 * 4096)]))
                t = DirtyTracker([GuestRegion(0, 64 * 4096)], tracked)
                t.start()
                for _ in range(2):
                    t.sync()
                    t.take_dirty_runs(1024)
                for tc in tracked:
                    t.unmap(tc.space.name, tc.mappings[0].iova, 37 * 4096)
                t.status()
                t.stop()
                for c, _ in spaces:
                    c.close()
        finally:
            host.close()
