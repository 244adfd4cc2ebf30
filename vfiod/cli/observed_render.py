"""``vfiod ctl status``'s lines for observe-only devices (docs/architecture.md §8.5):
another VMM's devices, with the migration state debugfs shows, when it was read, and
why it could not be read."""

from __future__ import annotations

from typing import Any, TextIO


def write_observed(rows: list[dict[str, Any]], out: TextIO) -> None:
    if not rows:
        return
    out.write("\nobserved (owned by another VMM; state read from debugfs, never touched):\n")
    for row in rows:
        owner = f"owner {row['owner'] or '-'}"
        if row["state"] is None:
            what = f"unreadable ({row['problem']}): {row['reason']}"
        elif row["problem"] is None and row["reason"]:
            what = f"{row['state']:<13} {row['reason']}"
        else:
            what = f"{row['state']:<13}"
        out.write(f"  {row['device']:<38} {owner:<16} {what}   read "
                  f"{row['age_s']:.1f} s ago\n")
