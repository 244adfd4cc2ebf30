"""Host side of the real-kernel tier (docs/testing.md "The real-kernel tier").

* The guest suite (tests/kernel/guest) is never collected on the host: it runs inside the
  QEMU guest, where VFIOD_GUEST=1.
* ``guest_run`` boots the guest once per session and runs the whole guest suite there;
  each guest test is then reported by its own host test (test_kernel_tier.py).
* The time each part took (download, mtty build, initramfs, boot, guest tests) is printed
  in the terminal summary, warm or cold.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.kernel import assets as assets_mod
from tests.kernel import vm as vm_mod
from tests.kernel.guest import numba_cache

IN_GUEST = os.environ.get("VFIOD_GUEST") == "1"
collect_ignore = [] if IN_GUEST else ["guest"]

_TIMINGS = pytest.StashKey[assets_mod.Timings]()


def _timings(config: pytest.Config) -> assets_mod.Timings:
    if _TIMINGS not in config.stash:
        config.stash[_TIMINGS] = assets_mod.Timings()
    return config.stash[_TIMINGS]


@pytest.fixture(scope="session")
def guest_assets(request: pytest.FixtureRequest) -> assets_mod.GuestAssets:
    why = vm_mod.why_not_runnable()
    if why:
        pytest.skip(why)
    return assets_mod.prepare(_timings(request.config))


@pytest.fixture(scope="session")
def guest_run(request: pytest.FixtureRequest, guest_assets: assets_mod.GuestAssets,
              tmp_path_factory: pytest.TempPathFactory) -> vm_mod.GuestRun:
    """Boot once and run every guest test file. A guest that does not finish (timeout,
    crash) comes back as a run with ``error`` set: every host test fails on it."""
    results = tmp_path_factory.mktemp("guest-results")
    timings = _timings(request.config)
    guest_dir = Path(__file__).parent / "guest"
    # numba cannot compile in the guest in reasonable time (20-80 s per kernel under
    # TCG): compile for a portable target here, the guest loads it (guest/numba_cache.py)
    with timings.part("numba cache (guest)"):
        numba_cache.warm_guest_numba_cache()
    try:
        with timings.part("boot + guest tests (did not finish)"):
            run = vm_mod.run_guest(guest_assets, results,
                                   [str(guest_dir.relative_to(assets_mod.REPO))])
    except vm_mod.VmError as e:
        return vm_mod.failed_run(e, results)
    del timings.parts["boot + guest tests (did not finish)"]
    timings.parts["boot"] = run.boot_seconds
    timings.parts["guest tests"] = run.command_seconds
    return run


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    if _TIMINGS not in config.stash or not config.stash[_TIMINGS].parts:
        return
    terminalreporter.section("real-kernel tier: time per part")
    for line in config.stash[_TIMINGS].lines():
        terminalreporter.write_line(line)
