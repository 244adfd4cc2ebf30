"""Boot the real-kernel tier's QEMU guest once and collect what it ran.

docs/testing.md "The real-kernel tier" is the recipe: ``-accel tcg`` (the host's /dev/kvm cannot
run a stock kernel), ``-machine q35`` with ``-device intel-iommu,intremap=on`` (without
intremap VFIO_SET_IOMMU fails with EPERM) and ``intel_iommu=on``, QEMU's ``edu`` PCI device
for vfio-pci, the host root shared read-only over 9p (the guest overlays a tmpfs on it)
and a second, writable 9p share (``results``) carrying the command in and the output, the
kernel log and the exit code out. native/kernel/init.sh is the guest side of this contract.

A hard timeout kills QEMU so a hung guest fails the test with the console tail instead of
hanging CI. A guest kernel that panics before its command starts ran nothing, and is booted
again once (``BOOT_ATTEMPTS``); a panic once the command ran fails as any crash does.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.kernel.assets import REPO, GuestAssets

#: Where init.sh mounts the results share inside the guest's root.
GUEST_RESULTS = "/vfiod-results"
#: Console markers printed by init.sh.
MARK_COMMAND_START = "vfiod-guest: command start"
MARK_COMMAND_EXIT = "vfiod-guest: command exit"
MARK_FATAL = "vfiod-guest: FATAL"
#: the kernel's own last words
KERNEL_PANIC = "Kernel panic - not syncing"
#: boots per run: under TCG (QEMU 7.2, -smp 2) the guest kernel panicked before init in 1
#: of about 25 boots here (a fatal exception in enqueue_timer, 1.3 s into the boot)
BOOT_ATTEMPTS = 2

DEFAULT_TIMEOUT = 480.0
#: guest test files that boot a guest of their own: each starts several Python processes
#: under TCG (about a minute), which would bring the shared boot near its time limit
#: (docs/testing.md "The real-kernel tier": split boots rather than raise it)
OWN_BOOT = ("test_vmm_shim.py",)


class VmError(RuntimeError):
    """The guest did not run its command to the end; says why, with the console tail."""


@dataclass
class GuestRun:
    """What one boot produced: exit code of the guest command, its output, the kernel log,
    the console, the junit XML path and host-side timing."""

    exit_code: int
    output: str
    dmesg: str
    console: str
    junit: Path
    boot_seconds: float
    command_seconds: float
    #: set instead of raising when the guest never finished (see ``failed_run``)
    error: str | None = None


def failed_run(err: VmError, results: Path) -> GuestRun:
    """A run that did not finish, as a value: the session's host tests then report it once
    in full (test_guest_suite_passed) and briefly everywhere else, instead of repeating
    the console tail in every test's setup error."""
    return GuestRun(exit_code=-1, output="", dmesg="", console="", junit=results / "junit.xml",
                    boot_seconds=0.0, command_seconds=0.0, error=str(err))


def timeout_from_env() -> float:
    """``$VFIOD_KERNEL_TIMEOUT`` (seconds QEMU may run), default 240."""
    raw = os.environ.get("VFIOD_KERNEL_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise VmError(f"VFIOD_KERNEL_TIMEOUT={raw!r} is not a positive number of seconds")
    return value


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def why_not_runnable() -> str | None:
    """What this host lacks to run the tier, phrased as what would enable it (the text of
    the skip; CI installs all of it)."""
    if qemu_binary() is None:
        return "qemu-system-x86_64 is not installed: apt-get install qemu-system-x86"
    for tool in ("apt-get", "apt-cache", "dpkg", "make", "gcc"):
        if shutil.which(tool) is None:
            return (f"{tool} is not installed (the tier fetches Debian packages and builds "
                    "mtty.ko: a Debian host with gcc and make)")
    return None


def guest_python() -> str:
    """The project venv's versioned interpreter (docs/testing.md: a shim costs seconds under
    emulation). ``sys.prefix`` is the venv this pytest runs in."""
    versioned = Path(sys.prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(versioned if versioned.exists() else Path(sys.executable))


def guest_command(pytest_args: list[str], junit: str) -> str:
    """cmd.sh: run the guest suite with the host's own venv and checkout."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(REPO),
        # ~15 s -> ~5 s of pytest start-up under emulation (docs/testing.md); the plugins this
        # suite relies on are named with -p below instead.
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        "VFIOD_GUEST": "1",
        "VFIOD_GUEST_RESULTS": GUEST_RESULTS,
    }
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
    argv = [guest_python(), "-m", "pytest", "-p", "pytest_timeout", "-p", "no:cacheprovider",
            "-q", "-o", "timeout=90", "--continue-on-collection-errors",
            f"--junitxml={junit}", *pytest_args]
    return (f"#!/bin/sh\n# written by tests/kernel/vm.py; run by native/kernel/init.sh\n"
            f"{exports}\ncd {shlex.quote(str(REPO))} || exit 127\n"
            f"exec {' '.join(shlex.quote(a) for a in argv)}\n")


def qemu_argv(assets: GuestAssets, results: Path, memory: str = "2G") -> list[str]:
    qemu = qemu_binary()
    if qemu is None:
        raise VmError("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    # panic=-1 + -no-reboot: a guest kernel panic (e.g. init dying) ends QEMU at once
    # instead of waiting for the watchdog. no_timer_check: on a loaded host, TCG can miss
    # the IO-APIC timer check's window and the kernel panics at boot ("timer doesn't
    # work through Interrupt-remapped IO-APIC"); the check proves nothing under emulation.
    append = " ".join([
        "console=ttyS0", "rdinit=/init", "intel_iommu=on", "panic=-1", "quiet",
        "loglevel=4", "no_timer_check",
    ])
    return [
        # -cpu max: the SSE4.2/AVX2 features numpy and numba dispatch on (qemu64 has none)
        qemu, "-accel", "tcg", "-machine", "q35", "-cpu", "max", "-smp", "2", "-m", memory,
        "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
        # the vIOMMU must exist before the devices behind it are created
        "-device", "intel-iommu,intremap=on",
        "-device", "edu",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                   "multidevs=remap",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none,"
                   "multidevs=remap",
        "-virtfs", f"local,path={REPO},mount_tag=repo,security_model=none,readonly=on,"
                   "multidevs=remap",
        "-kernel", str(assets.vmlinuz), "-initrd", str(assets.initramfs),
        "-append", append,
    ]


class _Console(threading.Thread):
    """Drains QEMU's serial console into a file and notes when the markers appear."""

    def __init__(self, stream: IO[bytes], path: Path) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.path = path
        self.marks: dict[str, float] = {}

    def run(self) -> None:
        with open(self.path, "wb") as log:
            for raw in iter(self.stream.readline, b""):
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace")
                for mark in (MARK_COMMAND_START, MARK_COMMAND_EXIT, MARK_FATAL):
                    if mark in line and mark not in self.marks:
                        self.marks[mark] = time.monotonic()


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


class _PanickedEarly(VmError):
    """The guest kernel panicked before its command started: nothing ran."""


def run_guest(assets: GuestAssets, results: Path, pytest_args: list[str],
              timeout: float | None = None) -> GuestRun:
    """Boot, run ``pytest pytest_args`` in the guest, power off; raise VmError if the guest
    did not finish its command (timeout, crash, missing share). A kernel panic before the
    command started boots again, up to ``BOOT_ATTEMPTS`` boots; each such boot's console
    is kept as ``console-panic-N.log``."""
    if timeout is None:
        timeout = timeout_from_env()
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        try:
            return _boot(assets, results, pytest_args, timeout)
        except _PanickedEarly as e:
            kept = results / f"console-panic-{attempt}.log"
            (results / "console.log").replace(kept)
            if attempt == BOOT_ATTEMPTS:
                raise VmError(f"the guest kernel panicked before its command in each of "
                              f"{BOOT_ATTEMPTS} boots; the last: {e}") from None
            print(f"kernel tier: the guest kernel panicked before its command started; "
                  f"booting again (console kept in {kept})", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def _boot(assets: GuestAssets, results: Path, pytest_args: list[str],
          timeout: float) -> GuestRun:
    """One boot of ``run_guest``."""
    results.mkdir(parents=True, exist_ok=True)
    for stale in ("exit-code", "output.log", "dmesg.log", "junit.xml",
                  "insmod-failures.log"):
        (results / stale).unlink(missing_ok=True)
    (results / "cmd.sh").write_text(guest_command(pytest_args, f"{GUEST_RESULTS}/junit.xml"))
    # the checkout comes as its own share (tag "repo"), mounted by init.sh at this path
    # over the guest's fresh /tmp and /run, so a checkout under /tmp (CI) is visible too
    (results / "repo-path").write_text(str(REPO))
    console_path = results / "console.log"
    argv = qemu_argv(assets, results)
    (results / "qemu-argv.txt").write_text(shlex.join(argv) + "\n")

    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    console = _Console(proc.stdout, console_path)
    console.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        console.join(timeout=10)
    t_end = time.monotonic()
    console_text = console_path.read_text(errors="replace")

    def read(name: str) -> str:
        p = results / name
        return p.read_text(errors="replace") if p.exists() else ""

    code_file = results / "exit-code"
    if not code_file.exists():
        if t_end - t0 >= timeout:
            why = f"the guest did not finish within {timeout:.0f} s and was killed"
        elif MARK_FATAL in console_text:
            why = "the guest's init gave up"
        elif KERNEL_PANIC in console_text and MARK_COMMAND_START not in console.marks:
            raise _PanickedEarly(f"QEMU exited {proc.returncode}\n--- console (tail) ---\n"
                                 f"{_tail(console_text)}")
        else:
            why = f"QEMU exited {proc.returncode} before the guest wrote its exit code"
        raise VmError(f"{why} (VFIOD_KERNEL_TIMEOUT sets the limit; artefacts in {results})\n"
                      f"--- guest output (tail) ---\n{_tail(read('output.log'))}\n"
                      f"--- console (tail) ---\n{_tail(console_text)}")
    start = console.marks.get(MARK_COMMAND_START, t0)
    end = console.marks.get(MARK_COMMAND_EXIT, t_end)
    return GuestRun(
        exit_code=int(code_file.read_text().strip() or "-1"),
        output=read("output.log"), dmesg=read("dmesg.log"), console=console_text,
        junit=results / "junit.xml",
        boot_seconds=(start - t0) + (t_end - end), command_seconds=end - start)
