"""The guest's test environment: checks that it is what the tests need, and the sysfs
set-up that is not vfiod's job (creating mtty mdevs, binding edu to vfio-pci).

Runs only inside the QEMU guest of the real-kernel tier (docs/testing.md; docs/kernel-contract.md §9.1,
§9.2). Every missing piece fails with what is missing and what would provide it, never a
skip: a guest that lacks a module is a broken rig, not an optional feature.

VFIO itself is driven only through vfiod (``vfiod.vfio`` over ``LinuxKernel``); the plain
file writes here are the administrator's side (sysfs), as a host operator would do them.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import vfiod.abi.vfio as v
from vfiod.kernel.ops import KernelOps
from vfiod.vfio import Device

if TYPE_CHECKING:
    from vfiod.migration.guest.memory import RamBlock

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


# -- mtty mdevs (docs/kernel-contract.md §9.1) ---------------------------------------------------------

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


# -- edu behind the emulated intel-iommu, bound to vfio-pci (docs/kernel-contract.md §9.2) -------------

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

@contextmanager
def guest_ram(kernel: KernelOps, size: int) -> Iterator[RamBlock]:
    """``size`` bytes of guest RAM at guest address 0, as a guest's RAM is: vfiod's
    ``RamBlock``, a memfd mapped into this process whose ``addr`` MAP_DMA is given."""
    # imported here: vfiod.migration pulls in numba, which conftest.py must configure first
    from vfiod.migration.guest.memory import RamBlock
    from vfiod.vfio import RamRegion

    block = RamBlock.open(kernel, RamRegion("ram", 0, size), label="vfiod-guest-ram")
    try:
        yield block
    finally:
        block.close()


# -- mtty's UART registers, the device state a migration must carry (docs/kernel-contract.md §9.1) ----

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
