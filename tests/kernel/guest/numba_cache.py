"""numba in the guest (docs/testing.md "The real-kernel tier").

numba keys its cache by the CPU it compiled for, and the guest's TCG CPU ("k8-sse3" with
AVX2 under QEMU 7.2) is not the host's, so the host's ordinary cache never hits there;
compiling under TCG takes 20-80 s per kernel. So the host compiles what the guest tests
run for numba's portable target ("generic", no CPU features) into GUEST_NUMBA_CACHE
before booting (``warm_guest_numba_cache``), and the guest loads from there with the
same target (``guest_numba_env``, applied by conftest.py before numba is imported). The
guest sees the host root read-only under a tmpfs overlay: numba can still write, and
what it writes is lost, which is fine. With "generic" the CRC-32C stream checksum uses
its table kernel (crc32c._sse42_usable), identically on both sides.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import vfiod.abi.vfio as v
from tests.kernel.guest.rig import REPO, guest_ram

GUEST_NUMBA_CACHE = REPO / ".cache" / "numba-guest"
#: written by ``warm_guest_numba_cache`` once the cache holds everything
GUEST_NUMBA_STAMP = GUEST_NUMBA_CACHE / "warmed"
#: written instead when the warm-up failed: its output, for the guest tests to show
GUEST_NUMBA_FAILED = GUEST_NUMBA_CACHE / "warm-up-failed.log"


def guest_numba_env() -> dict[str, str]:
    # NUMBA_CPU_NAME=generic makes numba default NUMBA_CPU_FEATURES to "" (portable)
    return {"NUMBA_CACHE_DIR": str(GUEST_NUMBA_CACHE), "NUMBA_CPU_NAME": "generic"}


def warm_guest_numba_cache(timeout: float = 900.0) -> float:
    """Host side, before boot: compile (or just load, when cached) every numba kernel
    the guest tests use into GUEST_NUMBA_CACHE, in a subprocess so this process's numba
    keeps its own target. Returns the seconds it took. A failure does not raise: the
    guest tests that need the cache fail with its output (``guest_numba_ready``)."""
    t0 = time.monotonic()
    GUEST_NUMBA_CACHE.mkdir(parents=True, exist_ok=True)
    GUEST_NUMBA_STAMP.unlink(missing_ok=True)
    GUEST_NUMBA_FAILED.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), **guest_numba_env())
    argv = [sys.executable, "-c", "from tests.kernel.guest import numba_cache; "
            "numba_cache._exercise_numba_paths()"]
    try:
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        failed = (f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
                  if proc.returncode else "")
    except subprocess.TimeoutExpired:
        failed = f"did not finish within {timeout:.0f} s"
    if failed:
        GUEST_NUMBA_FAILED.write_text(failed)
    else:
        GUEST_NUMBA_STAMP.write_text(f"{time.time():.0f}\n")
    return time.monotonic() - t0


def guest_numba_ready() -> str | None:
    """None if the host warmed the guest's numba cache since the kernels last changed,
    else what is missing."""
    fix = ("the host must run tests.kernel.guest.numba_cache.warm_guest_numba_cache() "
           "before booting the guest (compiling numba kernels under TCG takes minutes)")
    if GUEST_NUMBA_FAILED.exists():
        return (f"the host's warm-up of the guest's numba cache failed "
                f"({GUEST_NUMBA_FAILED}):\n{GUEST_NUMBA_FAILED.read_text()[-3000:]}")
    if not GUEST_NUMBA_STAMP.exists():
        return f"{GUEST_NUMBA_STAMP} is missing: {fix}"
    stamp = GUEST_NUMBA_STAMP.stat().st_mtime
    # numba invalidates a cached kernel when the file defining it changes
    newer = [str(p.relative_to(REPO)) for d in ("vfiod/dirty", "vfiod/migration/stream")
             for p in (REPO / d).glob("*.py")
             if p.stat().st_mtime > stamp and "numba" in p.read_text()]
    if newer:
        return f"{GUEST_NUMBA_STAMP} is older than {', '.join(sorted(newer))}: {fix}"
    return None


def _exercise_numba_paths() -> None:
    """Run, on the simulated kernel, the vfiod code paths the guest tests take through
    numba, so each kernel is compiled for the argument types they really pass."""
    from vfiod.dirty import bitmap_kernels as k
    from vfiod.dirty.global_bitmap import GlobalBitmap
    from vfiod.dirty.providers.base import DmaSpace
    from vfiod.dirty.tracker import DirtyTracker, TrackedContainer
    from vfiod.kernel.sim import SimHost
    from vfiod.kernel.sim.interfaces import DeviceSpec
    from vfiod.migration.guest.devices import join_group
    from vfiod.migration.session.switchover_warm_up import warm_source
    from vfiod.migration.stream import crc32c, ram_landing
    from vfiod.migration.stream.pagecrc import page_crcs, page_crcs_at
    from vfiod.vfio import Container, DmaMapping, HostPaths, RamRegion

    crc32c.warm_up()
    ram_landing.warm_up()     # a RAM_RUNS record's copy to its runs
    # what each end runs before its first migration (and vfiod kernels): every kernel
    # of a sync, type1's in-place reports included, the count of pages never sent, and
    # the switchover's rehearsal
    warm_source()
    with mmap.mmap(-1, 4 * 4096) as mm:       # the stream hashes views of guest RAM mmaps
        page_crcs(memoryview(mm), 4096)
        page_crcs(memoryview(mm)[4096:], 4096)
        # a batch of short runs (RAM_RUNS) takes one call over the region's whole view
        page_crcs_at(memoryview(mm), np.array([0, 2], dtype=np.int64), 4096)
    words = np.zeros(4, dtype=np.uint64)
    k.set_range(words, 3, 100)
    k.popcount(words, 200)
    # a run longer than max_run is cut (_k_split_runs): a first pass over a guest of more
    # than max_run_pages (1024) dirty pages in a row, as the daemon tests migrate
    k.dirty_runs(words, 200, 64)
    k.test_and_clear(words, 0, 200)
    k.dirty_runs(words, 200, 64)
    GlobalBitmap(256).mark_all()
    mdev, pci = "5c3b1c1e-0000-4000-8000-00000000c0de", "0000:00:03.0"
    with tempfile.TemporaryDirectory() as root:
        host = SimHost.build(root, [[DeviceSpec(mdev, kind="mdev", dma_logging=True,
                                              mig_flags=v.VFIO_MIGRATION_STOP_COPY)],
                                    [DeviceSpec(pci, migration="none")]])
        paths = HostPaths(host.sysfs_root, host.dev_root)
        try:
            with guest_ram(host.kernel, 64 * 4096) as ram:
                spaces = []
                for name in (mdev, pci):
                    c = Container.open(host.kernel, paths)
                    g = join_group(host.kernel, paths, c, host.group_of(name))
                    spaces.append((c, DmaSpace(name, [g.get_device(name)], type1=c)))
                tracked = []
                for i, (c, space) in enumerate(spaces):
                    iova = 0x10_0000_0000 + i * 0x1000_0000
                    c.map_dma(iova, ram.addr + 4096, 37 * 4096)
                    c.map_dma(iova + 37 * 4096, ram.addr + 40 * 4096, 20 * 4096)
                    tracked.append(TrackedContainer(space, [DmaMapping(iova, 37 * 4096, 4096),
                                   DmaMapping(iova + 37 * 4096, 20 * 4096, 40 * 4096)]))
                t = DirtyTracker([RamRegion("ram", 0, 64 * 4096)], tracked)
                t.start()
                for _ in range(2):
                    t.sync()
                    t.take_dirty_runs(1024)
                for tc in tracked:
                    t.unmap(tc.space.name, tc.mappings[0].iova, 37 * 4096)
                t.status()
                t.stop()
                for c, _ in spaces:
                    c.close()
        finally:
            host.close()
