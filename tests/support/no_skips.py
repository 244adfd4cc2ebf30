"""A pytest plugin for ``make test`` (``-p tests.support.no_skips``): a skipped test is
not a pass. Every skip is listed with its reason and the run fails, so a machine that
lacks something (QEMU, promtool, root) cannot report a green suite with a tier left out
(README "Test")."""

from __future__ import annotations

import pytest


class SkipsFail:
    def __init__(self) -> None:
        self.skipped: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = (report.longrepr[2] if isinstance(report.longrepr, tuple)
                      else str(report.longrepr))
            self.skipped.append(f"{report.nodeid}: {reason}")

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.skipped and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.skipped:
            terminalreporter.section("skipped tests fail make test", red=True)
            terminalreporter.line(f"{len(self.skipped)} test(s) skipped; make test runs every "
                                  "tier (install what the reasons name: .ci/deps ensure, "
                                  "as root):")
            for line in self.skipped:
                terminalreporter.line(f"  {line}")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipsFail(), "vfiod-skips-fail")
