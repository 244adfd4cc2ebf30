"""The QEMU VM tier (docs/architecture.md §8.3): real QEMU 7.2 VMs under TCG, booting the kernel
tier's Debian kernel with the workload initramfs (tests/support/qemu).

* ``qemu_guest_assets`` prepares the kernel and initramfs once per session. A host
  without QEMU, gcc or the kernel fails the tests naming what is missing: nothing here
  skips (``make test`` installs .ci/deps).
* ``qemu_guests`` makes QemuGuest objects and kills every QEMU it made when the test ends,
  passed or failed; on failure it prints each guest's QEMU stderr and console tail.
* ``qemu_measure`` records timings; the terminal summary prints them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.qemu.assets import QemuGuestAssets, prepare_qemu_guest
from tests.support.qemu.guest import QemuGuest, qemu_binary

_MEASURED = pytest.StashKey[list[str]]()
_FAILED = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def qemu_guest_assets() -> QemuGuestAssets:
    qemu_binary()                    # fails naming the package when QEMU is missing
    return prepare_qemu_guest()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture
def qemu_guests(request: pytest.FixtureRequest, qemu_guest_assets: QemuGuestAssets,
                tmp_path: Path) -> Iterator[Callable[[str], QemuGuest]]:
    """``make(name)`` -> a QemuGuest working in ``tmp_path/name`` (not started)."""
    made: list[QemuGuest] = []

    def make(name: str) -> QemuGuest:
        guest = QemuGuest(qemu_guest_assets, tmp_path / name, name)
        made.append(guest)
        return guest

    try:
        yield make
    finally:
        failed = request.node.stash.get(_FAILED, False)
        for guest in made:
            if failed:
                print(guest.failure_context())
            guest.kill()


@pytest.fixture
def qemu_measure(request: pytest.FixtureRequest) -> Callable[[str, float, str], None]:
    """``measure(what, value, unit)``: printed now and in the terminal summary."""
    lines = request.config.stash.setdefault(_MEASURED, [])

    def measure(what: str, value: float, unit: str) -> None:
        line = f"{request.node.name}: {what} {value:.3f} {unit}"
        print(line)
        lines.append(line)
    return measure


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    if config.stash.get(_MEASURED, None):
        terminalreporter.section("QEMU VM tier: measurements")
        for line in config.stash[_MEASURED]:
            terminalreporter.write_line(line)
