"""One real QEMU 7.2 VM of the QEMU VM tier: the kernel tier's Debian kernel and the
workload initramfs under TCG, guest RAM shared from a file (docs/architecture.md §8.3).

The QEMU command line respects the facts docs/architecture.md §8.4 lists:

* RAM is ``memory-backend-file,share=on`` of RAM_MIB MiB + 8 KiB: a RAM block that is a
  multiple of 256 KiB loses dirty pages under TCG in QEMU 7.2.
* Two ``-qmp`` sockets: a QMP socket serves one client, so the test has ``qmp-test.sock``
  and ``qmp-vfiod.sock`` stays free for vfiod.
* A destination starts with ``-S -incoming defer``; ``start`` then asks for
  ``migrate-incoming tcp:127.0.0.1:<port>`` (port 0: QEMU picks a free one, no race with
  other tests) and reads the port back from ``query-migrate``.

The kernel command line reserves RESERVED_SIZE bytes at guest-physical RESERVED_GPA
(``memmap=<size>$<addr>``): the guest never uses that range, so a simulated device can
DMA-write into it through the RAM file. On q35 all RAM below 2.75 GiB is mapped at GPA 0
of the backend, so GPA == offset in the RAM file (the workload's pages record their GPA and
tests/support/qemu/pages.py checks it on every scan).

QEMU runs with ``-no-reboot`` and the kernel with ``panic=-1``: init dying ends QEMU at
once, and every wait here then fails with the console's tail instead of timing out.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.support.daemons import wait_until
from tests.support.qemu.assets import QemuGuestAssets
from tests.support.qemu.qmp import QmpClient

MiB = 1 << 20
#: RAM_MIB MiB + this: a size that is no multiple of 256 KiB (docs/architecture.md §8.4)
RAM_EXTRA = 8 << 10
DEFAULT_RAM_MIB = 128
DEFAULT_WORK_PAGES = 2048            # 8 MiB, the workload's own default
#: Inside low RAM, above where the kernel decompresses itself (16 MiB + its init_size,
#: 56 MiB for Debian's 6.12) and below the initrd and the firmware's tables at the top;
#: KASLR avoids memmap= ranges.
RESERVED_GPA = 0x5000000
RESERVED_SIZE = 16 * MiB

GENERATION = re.compile(r"workload: generation (\d+)")
#: console lines that say why a guest failed (``failure_context`` keeps them)
_FAILURE_LINE = re.compile(r"FATAL|Kernel panic|Oops|BUG:")
_SOCKET_PATH_MAX = 107
PR_SET_PDEATHSIG = 1
T = TypeVar("T")


class QemuGuestError(AssertionError):
    """QEMU or the guest did not do what the test waited for; carries the console tail."""


def qemu_binary() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise QemuGuestError("qemu-system-x86_64 is not installed: the QEMU VM tier boots a "
                             "real VM (apt-get install qemu-system-x86; .ci/deps ensure)")
    return qemu


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the pytest process dies, so not even a
    killed test run (pytest-timeout's thread method, SIGKILL) leaves a QEMU behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def kernel_command_line(work_pages: int) -> str:
    # ``$`` reaches the kernel literally: QEMU gets argv from Popen, no shell between
    return " ".join(["console=ttyS0", "panic=-1", "quiet", "rdinit=/init",
                     f"memmap={RESERVED_SIZE >> 20}M${RESERVED_GPA:#x}",
                     f"workload_pages={work_pages}"])


class QemuGuest:
    """A QEMU process and its files in ``workdir``: console.log, qemu.log (stderr),
    qmp-test.sock, qmp-vfiod.sock. ``start`` once; ``kill`` always (idempotent)."""

    def __init__(self, assets: QemuGuestAssets, workdir: Path, name: str) -> None:
        self.assets = assets
        self.name = name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.console_path = workdir / "console.log"
        self.stderr_path = workdir / "qemu.log"
        self.test_qmp_path = workdir / "qmp-test.sock"
        self.vfiod_qmp_path = workdir / "qmp-vfiod.sock"
        for sock in (self.test_qmp_path, self.vfiod_qmp_path):
            if len(str(sock)) > _SOCKET_PATH_MAX:
                raise QemuGuestError(f"{sock}: longer than a Unix socket path may be")
        self.ram_path: Path | None = None
        self.ram_size = 0
        self.work_pages = 0
        self.incoming_port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QmpClient | None = None
        self.started_at = 0.0

    # -- where things are ---------------------------------------------------------------
    @property
    def reserved_gpa(self) -> int:
        return RESERVED_GPA

    @property
    def reserved_size(self) -> int:
        return RESERVED_SIZE

    @property
    def reserved_offset(self) -> int:
        """Offset of the reserved range in the RAM file (== its GPA, see the docstring)."""
        return RESERVED_GPA

    def argv(self, ram_path: Path, incoming: bool, paused: bool) -> list[str]:
        size = self.ram_size
        argv = [
            qemu_binary(), "-accel", "tcg", "-machine", "q35,memory-backend=ram0",
            "-smp", "1", "-m", f"{size >> 10}K",
            "-object", f"memory-backend-file,id=ram0,size={size},mem-path={ram_path},"
                       "share=on",
            "-display", "none", "-nodefaults", "-no-reboot",
            "-serial", f"file:{self.console_path}",
            "-kernel", str(self.assets.vmlinuz), "-initrd", str(self.assets.initramfs),
            "-append", kernel_command_line(self.work_pages),
            "-qmp", f"unix:{self.test_qmp_path},server=on,wait=off",
            "-qmp", f"unix:{self.vfiod_qmp_path},server=on,wait=off",
        ]
        if incoming or paused:
            argv.append("-S")
        if incoming:
            argv += ["-incoming", "defer"]
        return argv

    def start(self, ram_file: Path, ram_mib: int = DEFAULT_RAM_MIB,
              incoming: int | None = None, paused: bool = False,
              work_pages: int = DEFAULT_WORK_PAGES, timeout: float = 20.0) -> None:
        """Launch QEMU on a fresh RAM file (``ram_mib`` MiB + 8 KiB, zero-filled) and
        connect the test's QMP client. ``incoming``: a port to take a migration on (0:
        any free port; ``incoming_port`` says which), started paused (``-S``), else the
        VM boots unless ``paused``."""
        if self.proc is not None:
            raise QemuGuestError(f"{self.name}: started twice")
        if RESERVED_GPA + RESERVED_SIZE > ram_mib * MiB - 32 * MiB:
            raise QemuGuestError(f"{self.name}: {ram_mib} MiB of RAM leaves no room above "
                                 f"the reserved range at {RESERVED_GPA:#x}")
        if "," in str(ram_file):
            raise QemuGuestError(f"{ram_file}: a comma would end QEMU's mem-path= option")
        self.ram_size = ram_mib * MiB + RAM_EXTRA
        self.work_pages = work_pages
        self.ram_path = ram_file
        with open(ram_file, "wb") as f:
            f.truncate(self.ram_size)
        for stale in (self.test_qmp_path, self.vfiod_qmp_path, self.console_path):
            stale.unlink(missing_ok=True)
        argv = self.argv(ram_file, incoming is not None, paused)
        (self.workdir / "qemu-argv.txt").write_text(" ".join(argv) + "\n")
        self.started_at = time.monotonic()
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         preexec_fn=_die_with_parent)
        self._wait(lambda: self.test_qmp_path.exists() and self.vfiod_qmp_path.exists(),
                   timeout, "both QMP sockets")
        self.qmp = QmpClient(str(self.test_qmp_path), timeout=timeout)
        if incoming is not None:
            self.qmp.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{incoming}")
            addrs = self.qmp.execute("query-migrate").get("socket-address", [])
            if not addrs:
                raise QemuGuestError(f"{self.name}: query-migrate names no listening "
                                     "address after migrate-incoming")
            self.incoming_port = int(addrs[0]["port"])

    # -- state ---------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def console_text(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def generations(self) -> list[int]:
        """Every generation the workload printed, in order."""
        return [int(n) for n in GENERATION.findall(self.console_text())]

    def last_generation(self) -> int:
        found = self.generations()
        return found[-1] if found else 0

    def failure_context(self, lines: int = 40) -> str:
        state = ("running" if self.alive() else
                 f"exited {self.proc.returncode}" if self.proc else "not started")
        stderr = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() \
            else ""
        text = self.console_text().splitlines()
        # the line that says why can sit above the tail: a guest whose init died prints
        # its FATAL line, then a kernel panic whose call trace alone may fill the tail
        earlier = [line for line in text[:-lines] if _FAILURE_LINE.search(line)][-10:]
        named = ("--- console (earlier lines naming a failure) ---\n"
                 + "\n".join(earlier) + "\n") if earlier else ""
        console = "\n".join(text[-lines:])
        return (f"QEMU {self.name} ({state}, files in {self.workdir})\n"
                f"--- qemu stderr ---\n{stderr[-3000:]}\n{named}"
                f"--- console (tail) ---\n{console}")

    def _wait(self, cond: Callable[[], T], timeout: float, what: str) -> T:
        def done() -> T:
            value = cond()
            if not value and self.proc is not None and self.proc.poll() is not None:
                raise QemuGuestError(f"{self.name} exited while waiting for {what}\n"
                                     + self.failure_context())
            return value
        try:
            return wait_until(done, timeout, f"{self.name}: {what}")
        except AssertionError as e:
            if isinstance(e, QemuGuestError):
                raise
            raise QemuGuestError(f"{e}\n{self.failure_context()}") from None

    def wait_console(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in the console, polled until the deadline."""
        rx = re.compile(pattern)
        return self._wait(lambda: rx.search(self.console_text()), timeout,
                          f"console to show {pattern!r}")

    def wait_generation_above(self, generation: int, timeout: float) -> int:
        """Wait until the workload prints a generation above ``generation``; return it."""
        def above() -> int:
            last = self.last_generation()
            return last if last > generation else 0
        return self._wait(above, timeout, f"a workload generation above {generation}")

    def wait_qmp(self, cond: Callable[[QmpClient], T], timeout: float, what: str) -> T:
        """Poll ``cond(qmp)`` on the test's QMP client until truthy (a query-migrate
        status, a run state), failing with the console tail at the deadline."""
        qmp = self.qmp
        if qmp is None:
            raise QemuGuestError(f"{self.name}: not started")
        return self._wait(lambda: cond(qmp), timeout, what)

    # -- the end -------------------------------------------------------------------------
    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop QEMU now (SIGKILL unless told) and reap it; safe to call again."""
        if self.qmp is not None:
            self.qmp.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
