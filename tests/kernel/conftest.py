"""Host side of the real-kernel tier (docs/testing.md "The real-kernel tier").

* The guest suite (tests/kernel/guest) is never collected on the host: it runs inside the
  QEMU guest, where VFIOD_GUEST=1.
* ``guest_runs`` boots the guest once per session for the guest suite, and once more for
  each file of ``vm.OWN_BOOT``; each guest test is then reported by its own host test
  (test_kernel_tier.py).
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


def _boot(request: pytest.FixtureRequest, guest_assets: assets_mod.GuestAssets,
          tmp_path_factory: pytest.TempPathFactory, name: str,
          pytest_args: list[str]) -> vm_mod.GuestRun:
    results = tmp_path_factory.mktemp(f"guest-results-{name}")
    timings = _timings(request.config)
    # numba cannot compile in the guest in reasonable time (20-80 s per kernel under
    # TCG): compile for a portable target here, the guest loads it (guest/numba_cache.py)
    with timings.part("numba cache (guest)"):
        numba_cache.warm_guest_numba_cache()
    unfinished = f"boot + guest tests, {name} (did not finish)"
    try:
        with timings.part(unfinished):
            run = vm_mod.run_guest(guest_assets, results, pytest_args)
    except vm_mod.VmError as e:
        return vm_mod.failed_run(e, results)
    del timings.parts[unfinished]
    timings.parts[f"boot ({name})"] = run.boot_seconds
    timings.parts[f"guest tests ({name})"] = run.command_seconds
    return run


@pytest.fixture(scope="session")
def guest_runs(request: pytest.FixtureRequest, guest_assets: assets_mod.GuestAssets,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, vm_mod.GuestRun]:
    """Boot once for the suite and once per ``vm.OWN_BOOT`` file: boot name -> its run
    ("suite" or the file's name). A guest that does not finish (timeout, crash) comes
    back as a run with ``error`` set: every host test of that boot fails on it."""
    guest_dir = (Path(__file__).parent / "guest").relative_to(assets_mod.REPO)
    runs = {"suite": _boot(request, guest_assets, tmp_path_factory, "suite",
                           [str(guest_dir)] + [f"--ignore={guest_dir / f}" for f in vm_mod.OWN_BOOT])}
    for f in vm_mod.OWN_BOOT:
        runs[f] = _boot(request, guest_assets, tmp_path_factory, f, [str(guest_dir / f)])
    return runs


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    if _TIMINGS not in config.stash or not config.stash[_TIMINGS].parts:
        return
    terminalreporter.section("real-kernel tier: time per part")
    for line in config.stash[_TIMINGS].lines():
        terminalreporter.write_line(line)
