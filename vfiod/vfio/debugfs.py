"""Reading the migration state of a device another VMM owns, from debugfs
(docs/kernel-contract.md §12; docs/architecture.md §8.5). Nothing here opens /dev/vfio or
the device: the only calls are ``KernelOps.read_debugfs`` and ``list_debugfs``.

``read_migration_state`` turns what ``vfio/<device>/migration/state`` says into a state
name of ``enum vfio_device_mig_state``; any other text (the kernel prints "Invalid" for a
value outside the enum; a newer kernel may add states) is reported as ``unknown`` with the
text kept, never an exception. When the file cannot be read, it says why, in words an
operator can act on, by looking at what does exist above it:

| ``problem``       | what is missing |
|---|---|
| ``denied``        | permission: debugfs is root-only (EACCES; EPERM from a lockdown) |
| ``no-debugfs``    | nothing mounted at /sys/kernel/debug |
| ``no-vfio-debugfs`` | no ``vfio/`` there: a kernel without CONFIG_VFIO_DEBUGFS (6.8+), or vfio not loaded |
| ``no-device``     | no ``vfio/<device>/``: the device is not registered with a VFIO driver |
| ``no-migration``  | no ``migration/``: its driver has no migration support |
| ``unreadable``    | the read failed otherwise (EINVAL: the driver could not get its state) |
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from vfiod.abi.vfio import vfio_device_mig_state
from vfiod.errors import KernelError
from vfiod.kernel.ops import DEBUGFS_ROOT, KernelOps

#: the state names debugfs prints: exactly the enum's names
KNOWN_STATES = frozenset(s.name for s in vfio_device_mig_state)
UNKNOWN_STATE = "unknown"
PROBLEMS = ("denied", "no-debugfs", "no-vfio-debugfs", "no-device", "no-migration",
            "unreadable")
#: the text of an unknown state kept for status: one short line, printable
_RAW_MAX = 64


@dataclass(frozen=True)
class MigrationStateReading:
    """One read of a device's debugfs migration state."""

    device: str
    state: str | None          # a KNOWN_STATES name, UNKNOWN_STATE, or None (unreadable)
    raw: str = ""              # what the file said (stripped, bounded)
    problem: str | None = None  # one of PROBLEMS when unreadable
    reason: str = ""           # for an operator: what is wrong and what to do

    @property
    def readable(self) -> bool:
        return self.problem is None


def state_path(device: str) -> str:
    return f"vfio/{device}/migration/state"


def parse_state_text(device: str, text: str) -> MigrationStateReading:
    """The file's text as a reading; anything that is not a state name is ``unknown``."""
    raw = "".join(c if c.isprintable() else "?" for c in text.strip())[:_RAW_MAX]
    if raw in KNOWN_STATES:
        return MigrationStateReading(device, raw, raw)
    return MigrationStateReading(device, UNKNOWN_STATE, raw,
                                 reason=f"debugfs says {raw!r}, not a state this vfiod knows")


def read_migration_state(kernel: KernelOps, device: str) -> MigrationStateReading:
    """Read ``device``'s state once; a failure is a reading with ``problem`` set."""
    path = state_path(device)
    try:
        return parse_state_text(device, kernel.read_debugfs(path))
    except KernelError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            return _denied(device, e)
        if e.errno != errno.ENOENT:
            return MigrationStateReading(
                device, None, problem="unreadable",
                reason=f"reading {DEBUGFS_ROOT}/{path} failed: {e.errno_name}"
                       + (" (the driver could not report its state)"
                          if e.errno == errno.EINVAL else ""))
    return _what_is_missing(kernel, device)


def _denied(device: str, e: KernelError) -> MigrationStateReading:
    return MigrationStateReading(
        device, None, problem="denied",
        reason=f"permission denied ({e.errno_name}): {DEBUGFS_ROOT} is readable by root only "
               "(mode 0700); run vfiod as root or give it CAP_DAC_READ_SEARCH "
               "(systemd/vfiod-observe.conf)")


def _what_is_missing(kernel: KernelOps, device: str) -> MigrationStateReading:
    """The state file is not there: name the first level of its path that is not."""
    def unreadable(problem: str, reason: str) -> MigrationStateReading:
        return MigrationStateReading(device, None, problem=problem, reason=reason)

    try:
        # An unmounted debugfs is an empty directory; without CONFIG_DEBUG_FS there is none.
        if not _entries_or_none(kernel, ""):
            return unreadable("no-debugfs", f"debugfs is not mounted at {DEBUGFS_ROOT} "
                              f"(mount -t debugfs debugfs {DEBUGFS_ROOT})")
        for parent, child, problem, reason in (
                ("", "vfio", "no-vfio-debugfs",
                 f"{DEBUGFS_ROOT}/vfio does not exist: this kernel was built without "
                 "CONFIG_VFIO_DEBUGFS (Linux 6.8+), or the vfio module is not loaded"),
                ("vfio", device, "no-device",
                 f"no VFIO device {device} in {DEBUGFS_ROOT}/vfio: it is not bound to a "
                 "VFIO driver (vfio-pci, a variant driver, an mdev)"),
                (f"vfio/{device}", "migration", "no-migration",
                 f"device {device} has no migration support: its driver registered no "
                 "migration ops, so there is no state to read")):
            if child not in kernel.list_debugfs(parent):
                return unreadable(problem, reason)
    except KernelError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            return _denied(device, e)
        return unreadable("unreadable", f"listing {DEBUGFS_ROOT}: {e.errno_name}")
    # every level is there and the file is not: it went away as we looked
    return unreadable("no-device", f"{DEBUGFS_ROOT}/{state_path(device)} disappeared while "
                      "it was read (the device was unbound)")


def _entries_or_none(kernel: KernelOps, relpath: str) -> list[str]:
    try:
        return kernel.list_debugfs(relpath)
    except KernelError as e:
        if e.errno == errno.ENOENT:
            return []
        raise
