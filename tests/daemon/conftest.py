"""The daemon tier's end of run: the fault matrix's table (tests/support/fault_table.py)."""

from __future__ import annotations

from typing import Any

from tests.support import fault_table


def pytest_terminal_summary(terminalreporter: Any) -> None:
    path = fault_table.write()
    if path is None:
        return
    terminalreporter.section("fault matrix: fault × point → outcome")
    for line in fault_table.markdown().splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"(written to {path})")
