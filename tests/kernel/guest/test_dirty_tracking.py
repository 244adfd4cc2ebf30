"""Dirty tracking on a real kernel (docs/kernel-contract.md §3.9, §7; docs/testing.md "What the guest
kernel offers"): type1 on an mtty-only container (pinned-page scope: nothing pinned, so
all zeros), type1 on the edu container (an IOMMU-backed group: every mapped page dirty on
every read), and device DMA logging on mtty (REPORT unsupported on this kernel)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from tests.kernel.guest import rig
from tests.kernel.guest.conftest import Opened
from vfiod.errors import KernelError
from vfiod.kernel.linux import LinuxKernel

IOVA = 0x10_0000_0000
PAGES = 100                        # not a multiple of 64: the last word is partial
SIZE = PAGES * 4096


def _bits(bitmap: np.ndarray, npages: int) -> np.ndarray:
    return np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:npages]


def test_type1_mtty_container_reports_nothing_dirty(kernel: LinuxKernel, mtty: Opened) -> None:
    c = mtty.container
    pgsize = c.iommu_info().dirty.pgsize  # type: ignore[union-attr]
    with rig.guest_ram(kernel, SIZE) as ram:
        c.map_dma(IOVA, ram.addr, SIZE)
        c.dirty_start()
        try:
            ram.mem[:] = b"\xff" * SIZE        # CPU writes are not device DMA
            bitmap = c.dirty_get(IOVA, SIZE, pgsize)
            assert _bits(bitmap, PAGES).sum() == 0
        finally:
            c.dirty_stop()
        c.unmap_dma(IOVA, SIZE)


def test_type1_edu_container_reports_every_page_dirty(kernel: LinuxKernel,
                                                      edu_dev: Opened) -> None:
    c = edu_dev.container
    pgsize = c.iommu_info().dirty.pgsize  # type: ignore[union-attr]
    with rig.guest_ram(kernel, SIZE) as ram:
        c.map_dma(IOVA, ram.addr, SIZE)
        c.dirty_start()
        try:
            for _ in range(2):                # read-and-clear, yet all dirty every time
                bitmap = c.dirty_get(IOVA, SIZE, pgsize)
                assert _bits(bitmap, PAGES).all()
                # and no bit beyond the range
                assert not np.unpackbits(bitmap.view(np.uint8), bitorder="little")[PAGES:].any()
        finally:
            c.dirty_stop()
        c.unmap_dma(IOVA, SIZE)


def test_type1_get_before_start_is_einval(kernel: LinuxKernel, edu_dev: Opened) -> None:
    c = edu_dev.container
    with rig.guest_ram(kernel, SIZE) as ram:
        c.map_dma(IOVA, ram.addr, SIZE)
        with pytest.raises(KernelError) as ei:
            c.dirty_get(IOVA, SIZE, 4096)
        assert ei.value.errno == errno.EINVAL
        assert "VFIO_IOMMU_DIRTY_PAGES(GET_BITMAP" in str(ei.value)
        c.unmap_dma(IOVA, SIZE)


def test_mtty_dma_logging_report_unsupported(mtty: Opened) -> None:
    dev = mtty.device
    assert dev.dma_logging_probe()
    dev.dma_logging_start([(IOVA, SIZE)], 4096)
    try:
        with pytest.raises(KernelError) as ei:
            dev.dma_logging_report(IOVA, SIZE, 4096)
        # this kernel lacks CONFIG_IOMMUFD_DRIVER: no iova_bitmap, so REPORT cannot work
        assert ei.value.errno == errno.EOPNOTSUPP
        assert "DMA_LOGGING_REPORT" in str(ei.value)
    finally:
        dev.dma_logging_stop()


def test_edu_has_no_dma_logging(edu_dev: Opened) -> None:
    assert not edu_dev.device.dma_logging_probe()
