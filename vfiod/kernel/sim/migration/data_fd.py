"""The v2 migration data fds (docs/kernel-contract.md §6.7, §6.8): the anonymous stream files a
``VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`` SET returns in ``data_fd``.

* ``SavingFile`` (O_RDONLY): ``read`` streams the session (``stream.SaveSession``). In
  PRE_COPY(_P2P) a temporary end of data fails with ENOMSG (mlx5) or returns 0 (mtty, qat),
  chosen per device by ``spec.extra["precopy_empty"]`` = "enomsg" | "zero"; in STOP_COPY 0
  is the end of the stream. ``VFIO_MIG_GET_PRECOPY_INFO`` answers initial/dirty bytes.
* ``ResumingFile`` (O_WRONLY): ``write`` feeds a ``stream.LoadSession``.

Both: after the session ended (state left, reset, device closed) reads/writes fail with
ENODEV; ``pread``/``pwrite`` are ESPIPE (stream files, the ``SimFile`` default); a read on
the write-only file and a write on the read-only one are EBADF, as the VFS answers.
Every read/write first passes the fault points ``read:data_fd`` / ``write:data_fd`` with
the device name as target; a fault at ``stall:data_fd`` makes the saving file never become
readable (a device that stops producing data): poll waits out its timeout.
"""

from __future__ import annotations

import ctypes
import errno
from typing import TYPE_CHECKING, Protocol

import vfiod.abi.vfio as v
from vfiod.kernel.sim.base import FaultInjector, SimFile, fail
from vfiod.kernel.sim.migration.stream import LoadSession, SaveSession
from vfiod.kernel.sim.uaccess import arg_view, copy_in, copy_out

if TYPE_CHECKING:
    from vfiod.kernel.ops import Buffer

S = v.MigState
PRECOPY_STATES = (S.PRE_COPY, S.PRE_COPY_P2P)


class MigrationOwner(Protocol):
    """What a data fd needs from its device: its name, state, faults and behaviour."""

    name: str
    state: v.vfio_device_mig_state
    faults: FaultInjector
    precopy_empty_enomsg: bool


class SavingFile(SimFile):
    kind = "mig_data"
    ioctl_names = v.MIG_DATA_IOCTLS

    def __init__(self, owner: MigrationOwner, session: SaveSession) -> None:
        super().__init__(owner.name)
        self.owner = owner
        self.session = session

    def read(self, length: int) -> bytes:
        op = "read(data_fd)"
        self.owner.faults.check("read:data_fd", op, self.name)
        if length < 0:
            raise fail(errno.EINVAL, op, self.name, f"negative length {length}")
        if self.session.ended:
            raise fail(errno.ENODEV, op, self.name, "the saving session has ended")
        data = self.session.read(length)
        if not data and length and self.owner.state in PRECOPY_STATES \
                and self.owner.precopy_empty_enomsg:
            # A temporary end of pre-copy data, not EOF (docs/kernel-contract.md §6.7).
            raise fail(errno.ENOMSG, op, self.name, "no pre-copy data right now")
        return data

    def readable(self) -> bool:
        return not self.owner.faults.stalls("stall:data_fd", self.name)

    def write(self, data: bytes) -> int:
        raise fail(errno.EBADF, "write(data_fd)", self.name, "saving data fd is read-only")

    def ioctl(self, request: int, arg: int | Buffer, label: str) -> int:
        if request != v.VFIO_MIG_GET_PRECOPY_INFO:
            raise fail(errno.ENOTTY, label, self.name, f"request {request:#x} on a data fd")
        mv = arg_view(arg, label, self.name)
        minsz = ctypes.sizeof(v.vfio_precopy_info)
        info = copy_in(mv, v.vfio_precopy_info, label, self.name, need=minsz)
        if info.argsz < minsz:
            raise fail(errno.EINVAL, label, self.name, f"argsz {info.argsz} < {minsz}")
        # mtty's order: the state check comes before the check for an ended session.
        if self.owner.state not in PRECOPY_STATES:
            raise fail(errno.EINVAL, label, self.name,
                       f"device is in {self.owner.state.name}, not a PRE_COPY state")
        if self.session.ended:
            raise fail(errno.ENODEV, label, self.name, "the saving session has ended")
        info.initial_bytes = self.session.initial_left
        info.dirty_bytes = self.session.dirty_bytes
        # ``flags`` is echoed back unchanged, as every driver before PRECOPY_INFOv2 does.
        copy_out(mv, info, minsz, label, self.name)
        return 0


class ResumingFile(SimFile):
    kind = "mig_data"
    ioctl_names: dict[int, str] = {}       # no ioctls on a resuming fd: ENOTTY

    def __init__(self, owner: MigrationOwner, session: LoadSession) -> None:
        super().__init__(owner.name)
        self.owner = owner
        self.session = session

    def read(self, length: int) -> bytes:
        raise fail(errno.EBADF, "read(data_fd)", self.name, "resuming data fd is write-only")

    def write(self, data: bytes) -> int:
        op = "write(data_fd)"
        self.owner.faults.check("write:data_fd", op, self.name)
        if self.session.ended:
            raise fail(errno.ENODEV, op, self.name, "the resuming session has ended")
        return self.session.write(bytes(data))
