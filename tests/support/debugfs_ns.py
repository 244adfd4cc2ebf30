"""The real kernel's debugfs, read through ``LinuxKernel`` in a private mount namespace
(docs/kernel-contract.md §12): a forked child unshares its mounts, mounts debugfs at
/sys/kernel/debug there (or leaves it unmounted), and reports what
``read_migration_state`` says as root, as nobody, and as nobody holding only
CAP_DAC_READ_SEARCH (what the hardened unit's drop-in grants). Nothing outside the child
sees its mounts."""

from __future__ import annotations

import ctypes
import dataclasses
import os
from typing import Any

from tests.support.as_nobody import in_forked_child
from vfiod.kernel.linux import LinuxKernel
from vfiod.kernel.ops import DEBUGFS_ROOT
from vfiod.vfio.debugfs import read_migration_state

NOBODY = 65534
_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18
_MNT_DETACH = 2
_PR_SET_KEEPCAPS = 8
_CAP_DAC_READ_SEARCH = 2
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _in_child(body: Any) -> dict[str, Any]:  # noqa: ANN401 - a callable returning JSON data
    """Run ``body()`` in a forked child; its JSON-able answer (a failure there fails)."""
    answer = in_forked_child(lambda: {"result": body()})
    assert "child" not in answer, answer["child"]
    return dict(answer["result"])


def _reading(device: str) -> dict[str, Any]:
    return dataclasses.asdict(read_migration_state(LinuxKernel(), device))


def _as_nobody(device: str, keep_dac_read_search: bool) -> dict[str, Any]:
    def body() -> dict[str, Any]:
        os.setgroups([])
        if keep_dac_read_search:
            _check(_libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        if keep_dac_read_search:
            bit = 1 << _CAP_DAC_READ_SEARCH
            data = (_CapData * 2)(_CapData(bit, bit, 0), _CapData(0, 0, 0))
            _check(_libc.capset(ctypes.byref(_CapHeader(_CAPABILITY_VERSION_3, 0)), data),
                   "capset")
        return _reading(device)
    return _in_child(body)


def observe_in_namespace(device: str, *, mounted: bool) -> dict[str, Any]:
    """``{"vfio_dir": bool, "root": reading, "nobody": ..., "nobody_dac_read_search": ...}``
    (readings as ``MigrationStateReading`` fields) in a new mount namespace where debugfs
    is mounted at /sys/kernel/debug, or nothing is."""
    def body() -> dict[str, Any]:
        _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None),
               "mount --make-rprivate /")
        _libc.umount2(DEBUGFS_ROOT.encode(), _MNT_DETACH)      # whatever the host mounted
        if mounted:
            _check(_libc.mount(b"debugfs", DEBUGFS_ROOT.encode(), b"debugfs", 0, None),
                   f"mount -t debugfs debugfs {DEBUGFS_ROOT}")
        return {"vfio_dir": os.path.isdir(f"{DEBUGFS_ROOT}/vfio"), "root": _reading(device),
                "nobody": _as_nobody(device, False),
                "nobody_dac_read_search": _as_nobody(device, True)}
    return _in_child(body)
