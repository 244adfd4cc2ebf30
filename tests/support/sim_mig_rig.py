"""The rig of the ``test_sim_mig_*`` tests (the simulated kernel's migration parts,
docs/kernel-contract.md §5 - §7; checked by tests/sim/test_sim_mig_common.py).

``MigRig`` builds a ``SimHost`` (helper B's simulated kernel) with one device per IOMMU
group and opens each device through its group (``rawvfio``), so every call below goes
through ``KernelOps`` with the ``vfiod.abi`` structs, as a caller of the real kernel would.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import vfiod.abi.vfio as v
from vfiod.errors import KernelError
from vfiod.kernel.sim.host import SimHost
from vfiod.kernel.sim.interfaces import DeviceParts, DeviceSpec
from vfiod.kernel.sim.migration import DeviceModel, capability_specs
from vfiod.kernel.sim.rawvfio import RawVfio, feature, open_device

S = v.MigState
GET, SET, PROBE = v.VFIO_DEVICE_FEATURE_GET, v.VFIO_DEVICE_FEATURE_SET, v.VFIO_DEVICE_FEATURE_PROBE
MIG_STATE = struct.Struct("<Ii")
U64 = struct.Struct("<Q")

#: Small devices keep the all-pairs walk fast; sizes are deliberately not chunk multiples.
SMALL = {"state_size": 10_000, "precopy_size": 20_000, "dirty_rate": 700}


def specs(**overrides: object) -> dict[str, DeviceSpec]:
    return capability_specs(**{**SMALL, **overrides})


def twin(spec: DeviceSpec, name: str = "0000:99:00.0") -> DeviceSpec:
    """A device of the same kind (a migration destination) in a different state."""
    return dataclasses.replace(spec, name=name, seed=spec.seed + 100)


class Dev:
    """One opened simulated device."""

    def __init__(self, rig: MigRig, spec: DeviceSpec, raw: RawVfio) -> None:
        self.rig = rig
        self.spec = spec
        self.raw = raw
        self.fd = raw.device
        self.node = rig.host.device(spec.name)

    @property
    def kernel(self):  # noqa: ANN201
        return self.rig.kernel

    @property
    def parts(self) -> DeviceParts:
        return self.node.parts

    @property
    def model(self) -> DeviceModel:
        model = self.parts.model
        assert isinstance(model, DeviceModel)
        return model

    def feature(self, fid: int, flags: int, payload: bytes | int = 0) -> bytearray:
        return feature(self.kernel, self.fd, fid, flags, payload)

    def get_state(self) -> S:
        buf = self.feature(v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, GET, MIG_STATE.size)
        state, data_fd = MIG_STATE.unpack_from(buf, 8)
        assert data_fd == -1
        return S(state)

    def set_state(self, state: int) -> int:
        """SET; returns data_fd (-1 = none). Raises KernelError as the kernel fails."""
        buf = self.feature(v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, SET,
                           MIG_STATE.pack(int(state), 12345))
        got, data_fd = MIG_STATE.unpack_from(buf, 8)
        assert got == int(state)
        return int(data_fd)

    def set_state_raw(self, state: int) -> tuple[bytearray, KernelError | None]:
        """SET, returning the buffer the kernel left and the error (if any)."""
        buf = v.feature_buffer(v.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, SET, MIG_STATE.size)
        MIG_STATE.pack_into(buf, 8, state, 12345)
        try:
            self.kernel.ioctl(self.fd, v.VFIO_DEVICE_FEATURE, buf)
        except KernelError as e:
            return buf, e
        return buf, None

    def mig_flags(self) -> int:
        return int(U64.unpack_from(self.feature(v.VFIO_DEVICE_FEATURE_MIGRATION, GET, 8), 8)[0])

    def data_size(self) -> int:
        buf = self.feature(v.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, GET, 8)
        return int(U64.unpack_from(buf, 8)[0])

    def reset(self) -> None:
        self.kernel.ioctl(self.fd, v.VFIO_DEVICE_RESET, 0)

    def precopy_info(self, data_fd: int, flags: int = 0) -> v.vfio_precopy_info:
        info = v.vfio_precopy_info(argsz=ctypes.sizeof(v.vfio_precopy_info), flags=flags)
        self.kernel.ioctl(data_fd, v.VFIO_MIG_GET_PRECOPY_INFO, info)
        return info

    def drain(self, data_fd: int, chunk: int = 3000) -> bytes:
        """Read until EOF (STOP_COPY) or the temporary end of pre-copy data
        (ENOMSG or a 0 read)."""
        out = bytearray()
        while True:
            try:
                data = self.kernel.read(data_fd, chunk)
            except KernelError as e:
                if e.errno == errno.ENOMSG:
                    return bytes(out)
                raise
            if not data:
                return bytes(out)
            out += data


class MigRig:
    def __init__(self, root: Path, specs_: list[DeviceSpec]) -> None:
        self.host = SimHost.build(root, [[s] for s in specs_])
        self.kernel = self.host.kernel
        self.faults = self.kernel.faults
        self.devs: dict[str, Dev] = {}
        for s in specs_:
            raw = open_device(self.kernel, self.host.dev_root, self.host.group_of(s.name), s.name)
            self.devs[s.name] = Dev(self, s, raw)

    def __getitem__(self, name: str) -> Dev:
        return self.devs[name]

    def close(self) -> None:
        for d in self.devs.values():
            d.raw.close()
        self.host.close()


RigFactory = Callable[..., MigRig]


def make_rigs(tmp_path: Path) -> Iterator[RigFactory]:
    """Body of each test module's ``rig`` fixture: ``rig(spec, ...)`` -> a MigRig with
    those devices, closed after the test."""
    made: list[MigRig] = []

    def make(*specs_: DeviceSpec) -> MigRig:
        r = MigRig(tmp_path / f"host{len(made)}", list(specs_))
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def migrate(src: Dev, dst: Dev, *, precopy: bool) -> bytes:
    """Source RUNNING -> (PRE_COPY ->) STOP_COPY -> STOP; stream into dst RESUMING -> STOP.
    Returns the stream."""
    stream = bytearray()
    if precopy:
        fd = src.set_state(S.PRE_COPY)
        src.model.tick(3)
        stream += src.drain(fd)
        src.model.tick(2)
        stream += src.drain(fd)
        assert src.set_state(S.STOP_COPY) == -1        # same session (§6.5)
    else:
        fd = src.set_state(S.STOP_COPY)
    assert fd >= 0
    stream += src.drain(fd)
    src.set_state(S.STOP)
    src.kernel.close(fd)
    rfd = dst.set_state(S.RESUMING)
    assert rfd >= 0
    dst.kernel.write(rfd, bytes(stream))
    dst.set_state(S.STOP)
    dst.kernel.close(rfd)
    return bytes(stream)
