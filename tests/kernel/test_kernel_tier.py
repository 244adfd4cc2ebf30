"""vfiod against a real Linux 6.12 VFIO kernel in a QEMU guest (testing.md "The real-kernel
tier"; vfio-uapi.md §9).

The guest boots once per session (``guest_run`` in conftest.py) and runs every test under
tests/kernel/guest. Here each guest test function becomes one host test carrying the
guest's verdict, so a failure names the guest test (with the guest's own report of it),
and one more host test checks the guest run as a whole (exit code,
nothing missing), printing the whole guest output when it did not pass.
"""

from __future__ import annotations

import pytest

from tests.kernel import results
from tests.kernel.assets import REPO
from tests.kernel.vm import GuestRun

#: The first test also pays for the session's downloads, builds and boot (QEMU itself is
#: cut off at VFIOD_KERNEL_TIMEOUT, 240 s by default): above the suite-wide 300 s.
pytestmark = pytest.mark.timeout(600)

GUEST_DIR = REPO / "tests" / "kernel" / "guest"
GUEST_TESTS = results.discover_guest_tests(GUEST_DIR)


def _outcomes(run: GuestRun) -> dict[str, list[results.CaseResult]]:
    return results.group_by_function(results.parse_junit(run.junit), GUEST_TESTS)


def test_guest_suite_passed(guest_run: GuestRun) -> None:
    if guest_run.exit_code != 0:
        pytest.fail(f"guest pytest exited {guest_run.exit_code}\n"
                    f"--- guest pytest output ---\n{guest_run.output}\n"
                    f"--- guest kernel log (tail) ---\n{results.tail(guest_run.dmesg, 40)}",
                    pytrace=False)


@pytest.mark.parametrize("guest_test", GUEST_TESTS)
def test_guest(guest_run: GuestRun, guest_test: str) -> None:
    cases = _outcomes(guest_run).get(guest_test, [])
    verdict = results.verdict(guest_test, cases)
    if verdict.outcome == "failed":
        pytest.fail(verdict.message, pytrace=False)
    if verdict.outcome == "skipped":
        pytest.skip(verdict.message)
