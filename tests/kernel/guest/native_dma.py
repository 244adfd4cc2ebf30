"""The guest's handle on our own mdev test device, ``vfiod_dma`` (native/vfiod_dma/README.md):
creating instances through sysfs and driving its control attributes.

Runs only inside the QEMU guest of the real-kernel tier (docs/testing.md "The real-kernel
tier"; the pinned-page scope of type1 is docs/kernel-contract.md §3.9). These are the
administrator's and the test's side of the device: VFIO itself is still driven only
through vfiod's layers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.kernel.guest import rig

PARENT = rig.SYS / "class" / "mdev_bus" / "vfiod_dma"
TYPE_NAME = "vfiod_dma-dev"
#: the driver refuses more ranges than this in one dma_write command
MAX_RANGES = 64
#: the migration stream's layout (native/vfiod_dma/README.md "Migration stream")
STREAM_HEADER = 24
RECORD = 16
CHUNK = 64 * 1024


def _write_attr(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


@contextmanager
def native_dma_mdev() -> Iterator[str]:
    """Create one vfiod_dma mdev; remove it afterwards. Fails naming what is missing."""
    rig.require_module("vfiod_dma")
    create = PARENT / "mdev_supported_types" / TYPE_NAME / "create"
    if not create.exists():
        pytest.fail(f"vfiod_dma is loaded but {create} is missing", pytrace=False)
    name = str(uuid.uuid4())
    _write_attr(create, name)
    try:
        yield name
    finally:
        remove = rig.SYS / "bus" / "mdev" / "devices" / name / "remove"
        if remove.exists():
            _write_attr(remove, "1")


class DmaControl:
    """The ``control/`` attributes of one vfiod_dma instance."""

    def __init__(self, name: str) -> None:
        self.dir = rig.SYS / "bus" / "mdev" / "devices" / name / "control"

    def _read(self, attr: str) -> str:
        return (self.dir / attr).read_text().strip()

    def dma_write(self, ranges: Iterable[tuple[int, int]], pattern: int,
                  mode: str = "rw") -> None:
        """DMA-write ``pattern`` over every (iova, length) range; ``mode`` "rw" goes
        through vfio_dma_rw(), "pin" pins each page, writes it and unpins it."""
        spans = " ".join(f"{iova:#x}:{length}" for iova, length in ranges)
        _write_attr(self.dir / "dma_write", f"{mode} {pattern:#x} {spans}")

    def _pairs(self, attr: str) -> dict[str, int]:
        words = self._read(attr).split()
        return {k: int(v) for k, v in zip(words[::2], words[1::2], strict=True)}

    def start_writer(self, rate: int, pattern: int, iova: int, pages: int) -> None:
        """The background writer: ``rate`` whole pages per second through vfio_dma_rw(),
        in turn over ``pages`` pages from ``iova``; lap k writes the byte pattern + k."""
        _write_attr(self.dir / "dma_rate", f"{rate} {pattern:#x} {iova:#x}:{pages}")

    def stop_writer(self) -> None:
        _write_attr(self.dir / "dma_rate", "0")

    def writer(self) -> dict[str, int]:
        """``rate`` (0: stopped), pages ``written`` since it started, ``error`` (-errno
        that stopped it, else 0)."""
        return self._pairs("dma_rate")

    def dma_stats(self) -> dict[str, int]:
        """Since the device was created: ``commands``, ``bytes`` written, pages ``pinned``."""
        return self._pairs("dma_stats")

    def mig_stats(self) -> dict[str, int]:
        """Of the latest saving session: ``precopy_bytes`` and ``stopcopy_bytes`` read."""
        return self._pairs("mig_stats")

    @property
    def state_size(self) -> int:
        return int(self._read("state_size"))

    @state_size.setter
    def state_size(self, size: int) -> None:
        _write_attr(self.dir / "state_size", str(size))

    def fill(self, seed: int, offset: int | None = None, length: int | None = None) -> None:
        """Pseudo-random bytes from ``seed``: the whole state, or ``length`` bytes at
        ``offset``."""
        span = "" if offset is None else f" {offset} {length}"
        _write_attr(self.dir / "state_fill", f"{seed}{span}")

    def fail_arc(self, arc: tuple[int, int] | None, errno_value: int | None = None) -> None:
        """Make the next (from, to) arc fail with ``errno_value``, or send the device to
        ERROR when it is None; ``arc`` None disarms."""
        if arc is None:
            text = "none"
        else:
            how = "error" if errno_value is None else str(errno_value)
            text = f"{int(arc[0])} {int(arc[1])} {how}"
        _write_attr(self.dir / "fail_arc", text)

    def armed_failure(self) -> str:
        """What ``fail_arc`` still waits for ("none" once it fired)."""
        return self._read("fail_arc")

    def checksum(self) -> str:
        """crc32 of the whole device state, as 8 hex digits."""
        return self._read("state_checksum")

    def mig_state(self) -> int:
        """The driver's own migration state (enum vfio_device_mig_state)."""
        return int(self._read("mig_state"))
