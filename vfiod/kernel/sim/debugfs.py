"""The simulated kernel's debugfs (docs/kernel-contract.md §12): what
``/sys/kernel/debug/vfio`` shows of the simulated devices, served from their live state
the way the kernel's seq_file does (the driver's ``migration_get_state``, no open fd),
with the real kernel's strings and errno values.

    vfio/<device>/                      every registered VFIO device (its dev_name)
    vfio/<device>/migration/state       only a device with v2 migration ops: "RUNNING\\n" ...

``mode`` says which host this is:

* ``"vfio"``: debugfs mounted, a kernel with CONFIG_VFIO_DEBUGFS, the caller root;
* ``"no-vfio"``: debugfs mounted, a kernel without CONFIG_VFIO_DEBUGFS (Debian's 6.12):
  no ``vfio/`` directory;
* ``"unmounted"``: nothing mounted at ``/sys/kernel/debug``: an empty directory;
* ``"denied"``: mounted, the caller neither root nor holding CAP_DAC_READ_SEARCH (the
  mount's root is mode 0700): EACCES for everything.

A state read first passes the fault point ``debugfs:state`` with the device as target
(EINVAL models a driver whose ``migration_get_state`` failed). ``reads`` counts state
reads, so a test can tell an observer read without opening anything.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

from vfiod.abi.vfio import vfio_device_mig_state
from vfiod.kernel.linux_text import debugfs_path
from vfiod.kernel.ops import DEBUGFS_ROOT
from vfiod.kernel.sim.base import FaultInjector, fail

DEBUGFS_MODES = ("vfio", "no-vfio", "unmounted", "denied")
#: entries a mounted debugfs has besides vfio/ (a 6.18 host shows these; empty here):
#: a mounted debugfs is never an empty directory, an unmounted one is
OTHER_ROOT_ENTRIES = ("bdi", "block", "dma_buf")
#: what the kernel prints for a state value outside the enum
INVALID_STATE_TEXT = "Invalid"

#: a device's current ``enum vfio_device_mig_state`` value (the driver's migration_get_state)
StateReader = Callable[[], int]


class SimDebugfs:
    def __init__(self, faults: FaultInjector, lock: threading.RLock) -> None:
        self.mode = "vfio"
        self.faults = faults
        self.lock = lock
        self.reads = 0
        self._devices: dict[str, StateReader | None] = {}

    def set_mode(self, mode: str) -> None:
        """Make this host one of ``DEBUGFS_MODES`` (a test may change it at any time)."""
        if mode not in DEBUGFS_MODES:
            raise ValueError(f"debugfs mode must be one of {DEBUGFS_MODES}, not {mode!r}")
        self.mode = mode

    def register(self, name: str, state: StateReader | None) -> None:
        """``vfio_device_debugfs_init``: a device registered with VFIO gets its directory;
        ``state`` (the driver's ``migration_get_state``) adds ``migration/state``."""
        self._devices[name] = state

    def read_file(self, relpath: str) -> str:
        op = f"read({debugfs_path(DEBUGFS_ROOT, relpath)})"
        node = self._lookup(relpath, op)
        if not callable(node):
            raise fail(errno.EISDIR, op)
        return node()

    def list_dir(self, relpath: str) -> list[str]:
        op = f"listdir({debugfs_path(DEBUGFS_ROOT, relpath)})"
        node = self._lookup(relpath, op)
        if callable(node):
            raise fail(errno.ENOTDIR, op)
        return sorted(node)

    def _lookup(self, relpath: str, op: str) -> list[str] | Callable[[], str]:
        """The directory's entries, or the file's reader; ENOENT/EACCES as the kernel."""
        if self.mode == "denied":
            raise fail(errno.EACCES, op, detail=f"{DEBUGFS_ROOT} is mode 0700, owner root")
        parts = [p for p in relpath.split("/") if p]
        root = [] if self.mode == "unmounted" else list(OTHER_ROOT_ENTRIES)
        root += ["vfio"] if self.mode == "vfio" else []
        if not parts:
            return root
        if parts[0] not in root:
            raise fail(errno.ENOENT, op)
        if parts[0] != "vfio":
            if len(parts) == 1:
                return []
            raise fail(errno.ENOENT, op)
        if len(parts) == 1:
            return list(self._devices)
        name = parts[1]
        if name not in self._devices:
            raise fail(errno.ENOENT, op)
        reader = self._devices[name]
        tree: list[tuple[list[str], list[str] | Callable[[], str]]] = [
            ([], ["migration"] if reader is not None else []),
            (["migration"], ["state"]),
            (["migration", "state"], lambda: self._state(name, reader, op))]
        for path, node in tree:
            if parts[2:] == path and (reader is not None or not path):
                return node
        raise fail(errno.ENOENT, op)

    def _state(self, name: str, reader: StateReader | None, op: str) -> str:
        assert reader is not None
        with self.lock:       # the driver's state mutex: never a state mid-transition
            self.faults.check("debugfs:state", op, name)
            self.reads += 1
            value = reader()
        try:
            return vfio_device_mig_state(value).name + "\n"
        except ValueError:
            return INVALID_STATE_TEXT + "\n"
