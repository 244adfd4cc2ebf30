"""vfiod against a real Linux 6.12 VFIO kernel in a QEMU guest (docs/testing.md "The real-kernel
tier"; docs/kernel-contract.md §9).

The guest boots once per session for the suite and once per ``OWN_BOOT`` file
(``guest_runs`` in conftest.py), together running every test under tests/kernel/guest. Here each guest test function becomes one host test carrying the
guest's verdict, so a failure names the guest test (with the guest's own report of it),
and one more host test checks the guest run as a whole (exit code,
nothing missing), printing the whole guest output when it did not pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kernel import assets, results
from tests.kernel.assets import REPO, GuestAssets
from tests.kernel.vm import OWN_BOOT, GuestRun
from tests.support import debian

#: The first test also pays for the session's downloads, builds and boot (QEMU itself is
#: cut off at VFIOD_KERNEL_TIMEOUT, 240 s by default): above the suite-wide 300 s.
pytestmark = pytest.mark.timeout(900)

GUEST_DIR = REPO / "tests" / "kernel" / "guest"
GUEST_TESTS = results.discover_guest_tests(GUEST_DIR)


def _outcomes(run: GuestRun) -> dict[str, list[results.CaseResult]]:
    return results.group_by_function(results.parse_junit(run.junit), GUEST_TESTS)


def _run_of(runs: dict[str, GuestRun], guest_test: str) -> GuestRun:
    """The boot that ran ``guest_test``: its file's own, or the suite's."""
    return runs.get(guest_test.split("::", 1)[0], runs["suite"])


@pytest.mark.parametrize("boot", ["suite", *OWN_BOOT])
def test_guest_suite_passed(guest_runs: dict[str, GuestRun], boot: str) -> None:
    guest_run = guest_runs[boot]
    if guest_run.error is not None:
        pytest.fail(guest_run.error, pytrace=False)
    if guest_run.exit_code != 0:
        pytest.fail(f"guest pytest exited {guest_run.exit_code}\n"
                    f"--- guest pytest output ---\n{guest_run.output}\n"
                    f"--- guest kernel log (tail) ---\n{results.tail(guest_run.dmesg, 40)}",
                    pytrace=False)


@pytest.mark.parametrize("guest_test", GUEST_TESTS)
def test_guest(guest_runs: dict[str, GuestRun], guest_test: str) -> None:
    guest_run = _run_of(guest_runs, guest_test)
    if guest_run.error is not None:
        pytest.fail(f"guest test {guest_test} has no result: the guest did not finish "
                    "(test_guest_suite_passed shows why)", pytrace=False)
    cases = _outcomes(guest_run).get(guest_test, [])
    verdict = results.verdict(guest_test, cases)
    if verdict.outcome == "failed":
        pytest.fail(verdict.message, pytrace=False)
    if verdict.outcome == "skipped":
        pytest.skip(verdict.message)


def test_warm_cache_downloads_and_builds_nothing(guest_assets: GuestAssets,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the session has prepared the guest, preparing again must touch no mirror and
    run no build: every step is keyed by package versions and found in the cache."""
    def no_download(package: str, into: Path) -> None:
        raise AssertionError(f"warm run downloaded {package}")

    def only_lookups(step: str, argv: list[str]) -> object:
        if "--show-depends" not in argv:
            raise AssertionError(f"warm run ran {step}: {' '.join(argv)}")
        return real_run(step, argv)

    def no_initramfs(*args: object) -> bytes:
        raise AssertionError("warm run rebuilt the initramfs")

    real_run = assets._run
    monkeypatch.setattr(debian, "_download", no_download)
    monkeypatch.setattr(assets, "_run", only_lookups)
    monkeypatch.setattr(assets, "build_initramfs", no_initramfs)
    again = assets.prepare(assets.Timings())
    assert again == guest_assets
