"""docs/architecture.md §7: modules stay small, one job each (at most 400 lines)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "vfiod"
MAX_LINES = 400


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, (f"{path.relative_to(ROOT.parent)} has {lines} lines (at most "
                                f"{MAX_LINES}): split it by job")
