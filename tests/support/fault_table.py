"""The fault matrix's table (fault × point → outcome): each case records its cell; the
daemon tier's conftest prints the tables at the end of the run and writes them, as
Markdown for the README, to ``.cache/fault-matrix.md``."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / ".cache" / "fault-matrix.md"

#: table title -> (row, column) -> cell, in the order the cases ran
TABLES: dict[str, dict[tuple[str, str], str]] = {}


def record(table: str, row: str, column: str, cell: str) -> None:
    TABLES.setdefault(table, {})[(row, column)] = cell


def markdown() -> str:
    out = []
    for title, cells in TABLES.items():
        rows = list(dict.fromkeys(r for r, _ in cells))
        cols = list(dict.fromkeys(c for _, c in cells))
        out += [f"**{title}**", "", "| | " + " | ".join(cols) + " |",
                "|---" * (len(cols) + 1) + "|"]
        out += [f"| {r} | " + " | ".join(cells.get((r, c), "") for c in cols) + " |"
                for r in rows]
        out.append("")
    return "\n".join(out)


def write() -> Path | None:
    """Write the tables (none recorded: nothing written); the path written."""
    if not TABLES:
        return None
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(markdown())
    return OUTPUT
