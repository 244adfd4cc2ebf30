"""A device whose data fd never returns data cannot hang a migration (issue 12): every
v2 data-fd read is polled first, for at most the driver's ``read_deadline_s``
(docs/kernel-contract.md §6.7), and a stalled stop-copy read fails with ETIMEDOUT naming
the read and the device, a kernel error like any other, so the source rolls back. In
pre-copy only a pass's first read waits; a fd not readable later in the pass ends the pass
(mlx5's poll is silent once its pre-copy data runs out), and the migration goes on.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from tests.support.session_rig import (
    MiB,
    SideContainer,
    assert_migrated,
    assert_rolled_back,
    migrate,
    pair,
    spec,
)
from vfiod.kernel.linux import LinuxKernel
from vfiod.migration.device.v2 import DEFAULT_READ_DEADLINE_S, V2Driver
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import SessionConfig

DEADLINE_S = 0.3


def test_stalled_stopcopy_read_times_out_and_rolls_back(tmp_path: Path) -> None:
    src, dst = pair(tmp_path, [SideContainer([spec("v2_stop_copy_log")])],
                    fill_bytes=1 * MiB)
    try:
        gdev = src.guest.devices[0]
        assert isinstance(gdev.driver, V2Driver)
        assert gdev.driver.read_deadline_s == DEFAULT_READ_DEADLINE_S
        gdev.driver.read_deadline_s = DEADLINE_S
        stall = src.kernel.faults.inject("stall:data_fd", errno.EAGAIN, count=-1)
        before = src.ram_digest()
        started = time.monotonic()
        run = migrate(src, dst, SessionConfig(policy=Policy(
            downtime_limit_s=1e-9, max_iterations=1, on_timeout="force")))
        took = time.monotonic() - started
        assert stall.hits == 1, "the stop-copy read was never polled"
        assert run.source.result == "failed", run.source
        assert os.strerror(errno.ETIMEDOUT) in run.source.reason or \
            "ETIMEDOUT" in run.source.reason, run.source.reason
        assert "read(migration data fd) in STOP_COPY" in run.source.reason
        assert gdev.name in run.source.reason
        assert f"no data within {DEADLINE_S:g} s" in run.source.reason
        assert DEADLINE_S <= took < DEFAULT_READ_DEADLINE_S
        assert_rolled_back(src, dst, run, before)
        assert run.source.rollback and all(v["state"] == "RUNNING"
                                           for v in run.source.rollback.values())
    finally:
        src.close()
        dst.close()


def test_stalled_first_precopy_read_times_out_and_rolls_back(tmp_path: Path) -> None:
    src, dst = pair(tmp_path, [SideContainer([spec("v2_precopy_log")])], fill_bytes=1 * MiB)
    try:
        gdev = src.guest.devices[0]
        gdev.driver.read_deadline_s = DEADLINE_S
        stall = src.kernel.faults.inject("stall:data_fd", errno.EAGAIN, count=-1)
        before = src.ram_digest()
        run = migrate(src, dst, SessionConfig(policy=Policy(
            downtime_limit_s=1e-9, max_iterations=2, on_timeout="force")))
        assert stall.hits == 1
        assert "read(migration data fd) in PRE_COPY" in run.source.reason, run.source.reason
        assert_rolled_back(src, dst, run, before)
    finally:
        src.close()
        dst.close()


def test_precopy_fd_not_readable_mid_pass_ends_the_pass(tmp_path: Path) -> None:
    src, dst = pair(tmp_path, [SideContainer([spec("v2_precopy_log")])], fill_bytes=1 * MiB)
    try:
        gdev = src.guest.devices[0]
        gdev.driver = V2Driver(gdev.driver.device, gdev.driver.migration_flags,
                               chunk_size=1000)      # a pass reads several chunks
        # the pass's first poll answers; the second finds nothing readable now
        stall = src.kernel.faults.inject("stall:data_fd", errno.EAGAIN, skip=1, count=1)
        run = migrate(src, dst, SessionConfig(policy=Policy(
            downtime_limit_s=1e-9, max_iterations=2, on_timeout="force")))
        assert stall.hits == 1
        assert_migrated(src, dst, run)
    finally:
        src.close()
        dst.close()


def test_linux_wait_readable_polls_with_a_deadline() -> None:
    k = LinuxKernel()
    r, w = os.pipe()
    try:
        assert k.wait_readable(r, 0.01) is False        # empty pipe: the deadline passes
        os.write(w, b"x")
        assert k.wait_readable(r, 0.01) is True
        os.read(r, 1)
        os.close(w)
        w = -1
        assert k.wait_readable(r, 0.01) is True         # end of stream: read returns 0
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
