"""Migration of our own test device on a real kernel (native/vfiod_dma/README.md;
docs/kernel-contract.md §6): migration v2 with STOP_COPY, P2P and PRE_COPY over a device
state of configurable size whose crc32 the device reports.

* Driven by hand through vfiod's ``Device``: PRE_COPY's initial and dirty bytes are exact
  (``VFIO_MIG_GET_PRECOPY_INFO``), pre-copy ends with ENOMSG until STOP_COPY, which keeps
  the same data fd and ends with 0; the stream restores the state on a second instance,
  and a corrupted one is refused at RESUMING -> STOP, leaving the destination as it was.
* Driven by vfiod's migration session over loopback TCP: the state, changed during
  pre-copy, arrives whole; the guest RAM the device DMA-wrote during pre-copy arrives too,
  with the pages its background writer kept rewriting (a new byte each lap, so a lost
  re-write would show); and the stop-and-copy carries only what pre-copy had not.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kernel.guest.conftest import Opened, open_device
from tests.kernel.guest.native_dma import CHUNK, RECORD, STREAM_HEADER, DmaControl
from tests.kernel.guest.test_migration_session import Side, migrate_tcp, side_pair
from tests.support.daemons import wait_until
from vfiod.errors import KernelError
from vfiod.kernel.linux import LinuxKernel
from vfiod.migration.planning.hostfacts import HostFacts
from vfiod.migration.session.source import SourceSession
from vfiod.migration.states import MigrationState, MigState
from vfiod.vfio import HostPaths

PAGE = 4096
MiB = 1 << 20


@pytest.fixture
def dma_src(kernel: LinuxKernel, paths: HostPaths,
            native_dma_pair: tuple[str, str]) -> Iterator[Opened]:
    o = open_device(kernel, paths, native_dma_pair[0])
    yield o
    o.container.close()             # the driver's close_device returns it to RUNNING


@pytest.fixture
def dma_dst(kernel: LinuxKernel, paths: HostPaths,
            native_dma_pair: tuple[str, str]) -> Iterator[Opened]:
    o = open_device(kernel, paths, native_dma_pair[1])
    yield o
    o.container.close()


def read_precopy(o: Opened, fd: int) -> bytes:
    """Everything pre-copy has now: reads until the temporary end (ENOMSG)."""
    out = bytearray()
    while True:
        try:
            chunk = o.device.data_read(fd, MiB)
        except KernelError as e:
            assert e.errno == errno.ENOMSG, e
            return bytes(out)
        assert chunk, "a 0 read in PRE_COPY"
        out += chunk


def read_to_end(o: Opened, fd: int) -> bytes:
    out = bytearray()
    while chunk := o.device.data_read(fd, MiB):
        out += chunk
    return bytes(out)


def restore(o: Opened, stream: bytes) -> None:
    """STOP -> RESUMING, the whole stream, RESUMING -> STOP (raises if the driver refuses)."""
    fd = o.device.set_mig_state(MigState.RESUMING)
    try:
        assert o.device.data_write(fd, stream) == len(stream)
        o.device.set_mig_state(MigState.STOP)
    finally:
        o.device.data_close(fd)


def test_native_dma_stopped_device_refuses_dma_and_state_changes(dma_src: Opened) -> None:
    ctl = DmaControl(dma_src.device.name)
    dev = dma_src.device
    dev.set_mig_state(MigState.STOP)
    try:
        assert ctl.mig_state() == MigState.STOP
        for act in (lambda: ctl.dma_write([(0, PAGE)], 0x11),
                    lambda: ctl.fill(3),
                    lambda: setattr(ctl, "state_size", 2 * PAGE)):
            with pytest.raises(OSError) as ei:
                act()
            assert ei.value.errno == errno.EBUSY
    finally:
        dev.set_mig_state(MigState.RUNNING)
    ctl.fill(3)


def test_native_dma_precopy_info_is_exact_and_the_stream_restores(
        dma_src: Opened, dma_dst: Opened) -> None:
    src, sctl = dma_src.device, DmaControl(dma_src.device.name)
    dctl = DmaControl(dma_dst.device.name)
    size = 5 * CHUNK + 100                              # 6 chunks, the last one short
    sctl.state_size = size
    sctl.fill(seed=11)
    dctl.state_size = CHUNK
    dctl.fill(seed=99)
    full = STREAM_HEADER + 6 * RECORD + size
    assert src.mig_data_size() == full + RECORD         # and the END record

    fd = src.set_mig_state(MigState.PRE_COPY)
    assert fd >= 0
    try:
        assert src.precopy_info(fd) == (full, 0)
        stream = bytearray(src.data_read(fd, STREAM_HEADER + RECORD + CHUNK))
        assert len(stream) == STREAM_HEADER + RECORD + CHUNK
        assert src.precopy_info(fd) == (full - len(stream), 0)
        # chunk 0 was sent, chunk 3 was not: only chunk 0 is dirty
        sctl.fill(seed=12, offset=10, length=20)
        sctl.fill(seed=13, offset=3 * CHUNK + 1, length=5)
        assert src.precopy_info(fd) == (full - len(stream), RECORD + CHUNK)
        stream += read_precopy(dma_src, fd)
        assert len(stream) == full + RECORD + CHUNK
        assert src.precopy_info(fd) == (0, 0)
        assert src.mig_data_size() == RECORD            # only END is owed
        sctl.fill(seed=14, offset=size - 50, length=50)     # the short last chunk
        assert src.precopy_info(fd) == (0, RECORD + 100)
        # PRE_COPY -> PRE_COPY_P2P -> STOP_COPY: the same fd goes on, to a real end
        assert src.set_mig_state(MigState.STOP_COPY) == -1
        assert sctl.mig_state() == MigState.STOP_COPY
        stream += read_to_end(dma_src, fd)
        assert len(stream) == full + (RECORD + CHUNK) + (RECORD + 100) + RECORD
        assert sctl.mig_stats() == {"precopy_bytes": full + RECORD + CHUNK,
                                    "stopcopy_bytes": RECORD + 100 + RECORD}
        want = sctl.checksum()
    finally:
        src.data_close(fd)
    src.set_mig_state(MigState.RUNNING)

    before = dctl.checksum()
    flipped = bytearray(stream)
    # a byte of chunk 1, sent once (chunk 0 went twice: its second copy would mend it)
    flipped[STREAM_HEADER + (RECORD + CHUNK) + RECORD + 7] ^= 0xFF
    for bad in (bytes(flipped), bytes(stream[:-RECORD])):      # ... and no END record
        with pytest.raises(KernelError) as ei:
            restore(dma_dst, bad)
        assert ei.value.errno == errno.EINVAL
        assert dma_dst.device.get_mig_state() is MigState.RESUMING
        dma_dst.device.reset()
        assert (dctl.state_size, dctl.checksum()) == (CHUNK, before)

    restore(dma_dst, bytes(stream))
    assert (dctl.state_size, dctl.checksum()) == (size, want)
    dma_dst.device.set_mig_state(MigState.RUNNING)


@pytest.fixture
def dma_sides(kernel: LinuxKernel, paths: HostPaths, native_dma_pair: tuple[str, str],
              host_facts: HostFacts) -> Iterator[tuple[Side, Side]]:
    with side_pair(kernel, paths, ("vm-dma-src", "vm-dma-dst"), native_dma_pair,
                   host_facts) as pair:
        yield pair


def test_native_dma_session_migrates_state_changed_in_precopy(
        dma_sides: tuple[Side, Side], numba_cache: None) -> None:
    src, dst = dma_sides
    sctl, dctl = DmaControl(src.dev.name), DmaControl(dst.dev.name)
    size = 3 * MiB + 123                                # not a whole number of chunks
    sctl.state_size = size
    sctl.fill(seed=0xC0FFEE)
    dctl.state_size = CHUNK
    dctl.fill(seed=1)
    sctl.dma_write([(5 * PAGE + 3, 2 * PAGE)], 0x5A)    # before the migration
    # and all along: 8 pages in turn, each lap a new byte, until the device stops
    sctl.start_writer(rate=100, pattern=0x01, iova=512 * PAGE, pages=8)
    wait_until(lambda: sctl.writer()["written"] >= 8, 30, "the writer's first lap")
    written = [(40 * PAGE, PAGE), (300 * PAGE + 17, 3000)]
    commands = sctl.dma_stats()["commands"]
    changed: dict[str, Any] = {}

    def busy_device(s: SourceSession) -> None:
        # during pre-copy the device writes guest RAM and changes its own state
        def handler(old: MigrationState, new: MigrationState) -> None:
            if new is MigrationState.ACTIVE:
                # the writer goes on during the migration: wait for two more pages
                at = sctl.writer()["written"]
                changed["writer"] = wait_until(
                    lambda: (n := sctl.writer()["written"]) >= at + 2 and n, 30,
                    "the writer to write during the migration")
                sctl.dma_write(written, 0xA7, "pin")
                changed["before"] = sctl.checksum()
                sctl.fill(seed=5, offset=MiB + 9, length=3 * PAGE)
        s.add_state_handler(handler)

    run = migrate_tcp(src, dst, on_source=busy_device)
    r, d = run.source, run.dest
    assert (r.result, d.result) == ("completed", "completed"), (r.reason, d.reason,
                                                                r.failed_hook, d.failed_hook)
    assert sctl.dma_stats()["commands"] == commands + 1, "no DMA during pre-copy"
    writer = sctl.writer()          # the source's release closed the device: it stopped
    assert writer["rate"] == 0 and writer["error"] == 0, writer
    assert writer["written"] >= changed["writer"] > 8
    assert src.log.states()[:2] == [MigState.RUNNING, MigState.PRE_COPY]
    assert dst.log.states()[-3:] == [MigState.RESUMING, MigState.STOP, MigState.RUNNING]
    # the state arrived whole, with the change made during pre-copy
    want = sctl.checksum()
    assert want != changed["before"]
    assert (dctl.state_size, dctl.checksum()) == (size, want)
    # pre-copy carried the bulk; stop-and-copy only what changed after it was sent
    stats = sctl.mig_stats()
    assert stats["precopy_bytes"] >= STREAM_HEADER + size
    assert stats["stopcopy_bytes"] <= 2 * (RECORD + CHUNK) + RECORD
    assert r.device_bytes_sent >= stats["precopy_bytes"] + stats["stopcopy_bytes"]
    # every page the device wrote arrived, the pre-copy ones included
    assert src.ram() == dst.ram()
    mem = dst.ram()
    for gpa, length in written:
        assert mem[gpa:gpa + length] == b"\xa7" * length
