"""``KernelOps.describe_fd`` and ``dup`` (docs/architecture.md §8.1: checking an fd a VMM
handed over): real fds are described by the real kernel, through the simulator too;
a simulated VFIO file is no memory file."""

from __future__ import annotations

import errno
import os

import pytest

from vfiod.errors import KernelError
from vfiod.kernel.linux import LinuxKernel
from vfiod.kernel.sim.base import SimFile
from vfiod.kernel.sim.kernel import SimKernel


@pytest.mark.parametrize("kernel", [LinuxKernel(), SimKernel()], ids=["linux", "sim"])
def test_a_memfd_a_pipe_and_a_read_only_file(kernel, tmp_path) -> None:
    memfd = os.memfd_create("describe")
    os.ftruncate(memfd, 8192)
    rd, wr = os.pipe()
    (tmp_path / "f").write_bytes(b"x" * 100)
    ro = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        m = kernel.describe_fd(memfd)
        assert (m.regular, m.kind, m.size, m.writable) == (True, "regular", 8192, True)
        copy = kernel.dup(memfd)
        try:
            c = kernel.describe_fd(copy)
            assert copy != memfd and (c.device, c.inode) == (m.device, m.inode)
        finally:
            kernel.close(copy)
        p = kernel.describe_fd(rd)
        assert (p.regular, p.kind) == (False, "fifo")
        r = kernel.describe_fd(ro)
        assert (r.regular, r.size, r.writable) == (True, 100, False)
        kernel.close(rd)
        with pytest.raises(KernelError) as e:
            kernel.describe_fd(rd)
        assert e.value.errno == errno.EBADF and f"fstat(fd {rd})" in str(e.value)
    finally:
        for fd in (memfd, wr, ro):
            os.close(fd)


def test_a_simulated_file_is_no_memory_file() -> None:
    k = SimKernel()
    fd = k.install(SimFile("vfio-container"))
    for call, name in ((k.describe_fd, "fstat"), (k.dup, "dup")):
        with pytest.raises(KernelError) as e:
            call(fd)
        assert e.value.errno == errno.EINVAL and f"{name}(fd {fd})" in str(e.value)
