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
        read = f"read {row['age_s']:.1f} s ago"
        if row["state"] is None:
            what = f"unreadable ({row['problem']}), {read}: {row['reason']}"
        else:        # a state name, or "unknown" with what debugfs said
            what = f"{row['state']:<13} {read}" + (f": {row['reason']}" if row["reason"]
                                                   else "")
        out.write(f"  {row['device']:<38} {owner:<16} {what}\n")
