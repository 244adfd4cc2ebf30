"""Migration v2 on a real driver (mtty, docs/kernel-contract.md §6, §9.1) through vfiod.vfio's
feature primitives: capability probe, MIG_DATA_SIZE, the PRE_COPY → PRE_COPY_P2P →
STOP_COPY save with the real data fd, PRECOPY_INFO, and a resume onto a second mtty that
carries UART register state across."""

from __future__ import annotations

import errno
import struct

import pytest

import vfiod.abi.vfio as v
from tests.kernel.guest.conftest import Opened
from vfiod.abi.vfio import MigState
from vfiod.errors import KernelError
from vfiod.vfio import Device

MTTY_MAGIC = 0x7E9D09898C3E2C4E
HEADER = struct.Struct("<QIIII")        # magic, major, minor, nr_ports, flags (24 bytes)
UART_SCR = 7                            # scratch register: plain read/write storage


def read_to_eof(dev: Device, fd: int) -> bytes:
    chunks = []
    while chunk := dev.data_read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_migration_flags(mtty: Opened) -> None:
    flags = mtty.device.mig_flags()
    assert flags == v.VFIO_MIGRATION_STOP_COPY | v.VFIO_MIGRATION_P2P | v.VFIO_MIGRATION_PRE_COPY


def test_mig_data_size_two_ports(mtty: Opened) -> None:
    assert mtty.device.mig_data_size() == 24 + 2 * 36


def test_opened_device_is_running(mtty: Opened) -> None:
    assert mtty.device.get_mig_state() == MigState.RUNNING


def test_precopy_cycle_with_real_data_fd(mtty: Opened) -> None:
    dev = mtty.device
    fd = dev.set_mig_state(MigState.PRE_COPY)
    assert fd >= 0, "RUNNING -> PRE_COPY opened no data fd"
    try:
        assert dev.get_mig_state() == MigState.PRE_COPY
        assert dev.precopy_info(fd) == (HEADER.size, 0)
        header = dev.data_read(fd, 4096)
        magic, major, minor, nr_ports, flags = HEADER.unpack(header)
        assert (magic, major, minor, nr_ports, flags) == (MTTY_MAGIC, 1, 0, 2, 0)
        assert dev.precopy_info(fd) == (0, 0)
        # mtty answers 0 at the temporary end of pre-copy data (not ENOMSG): not EOF
        assert dev.data_read(fd, 4096) == b""
        assert dev.set_mig_state(MigState.PRE_COPY_P2P) == -1
        assert dev.precopy_info(fd) == (0, 0)
        # STOP_COPY continues the same session: no new fd (docs/kernel-contract.md §11 pitfall 3)
        assert dev.set_mig_state(MigState.STOP_COPY) == -1
        assert dev.get_mig_state() == MigState.STOP_COPY
        rest = read_to_eof(dev, fd)
        assert len(header) + len(rest) == dev.mig_data_size() == 96
        # PRECOPY_INFO is only valid in the PRE_COPY states
        with pytest.raises(KernelError) as ei:
            dev.precopy_info(fd)
        assert ei.value.errno == errno.EINVAL
        assert dev.set_mig_state(MigState.STOP) == -1
        assert dev.set_mig_state(MigState.RUNNING) == -1
        assert dev.get_mig_state() == MigState.RUNNING
    finally:
        dev.data_close(fd)


def test_error_state_cannot_be_requested(mtty: Opened) -> None:
    with pytest.raises(KernelError) as ei:
        mtty.device.set_mig_state(MigState.ERROR)
    assert ei.value.errno == errno.EINVAL
    assert "MIG_DEVICE_STATE ERROR" in str(ei.value)
    assert mtty.device.get_mig_state() == MigState.RUNNING


def _save(dev: Device) -> bytes:
    """RUNNING → STOP_COPY (the kernel walks RUNNING_P2P, STOP) → read all → STOP."""
    fd = dev.set_mig_state(MigState.STOP_COPY)
    try:
        data = read_to_eof(dev, fd)
    finally:
        dev.data_close(fd)
    dev.set_mig_state(MigState.STOP)
    return data


def test_resume_carries_uart_state(mtty: Opened, mtty_dst: Opened) -> None:
    src, dst = mtty.device, mtty_dst.device
    src.write_region(v.VFIO_PCI_BAR0_REGION_INDEX, UART_SCR, b"\x5a")
    src.write_region(v.VFIO_PCI_BAR1_REGION_INDEX, UART_SCR, b"\xa5")
    dst.write_region(v.VFIO_PCI_BAR0_REGION_INDEX, UART_SCR, b"\x00")
    data = _save(src)
    assert len(data) == 96
    fd = dst.set_mig_state(MigState.RESUMING)
    assert fd >= 0
    try:
        assert dst.data_write(fd, data) == len(data)
    finally:
        dst.data_close(fd)
    dst.set_mig_state(MigState.STOP)       # the driver validates and applies here
    dst.set_mig_state(MigState.RUNNING)
    assert dst.read_region(v.VFIO_PCI_BAR0_REGION_INDEX, UART_SCR, 1) == b"\x5a"
    assert dst.read_region(v.VFIO_PCI_BAR1_REGION_INDEX, UART_SCR, 1) == b"\xa5"


def test_resume_rejects_a_foreign_stream(mtty_dst: Opened) -> None:
    dst = mtty_dst.device
    fd = dst.set_mig_state(MigState.RESUMING)
    try:
        bad = HEADER.pack(MTTY_MAGIC ^ 1, 1, 0, 2, 0)
        with pytest.raises(KernelError) as ei:
            dst.data_write(fd, bad)
        assert ei.value.errno == errno.EFAULT
        assert "write(migration data fd)" in str(ei.value)
    finally:
        dst.data_close(fd)
    # the session never got a valid stream: leaving RESUMING fails validation
    with pytest.raises(KernelError) as ei:
        dst.set_mig_state(MigState.STOP)
    state = dst.get_mig_state()
    assert state in (MigState.RESUMING, MigState.ERROR), state
    dst.reset()                            # the only way back (docs/kernel-contract.md §3.5)
    assert dst.get_mig_state() == MigState.RUNNING
