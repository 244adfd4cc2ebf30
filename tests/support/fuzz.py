"""The fuzz tests' budget: ``VFIOD_FUZZ_EXAMPLES`` (set by ``make fuzz``) replaces each
test's own small ``max_examples``, so ``make test`` stays fast and ``make fuzz`` goes long."""

from __future__ import annotations

import os


def fuzz_examples(default: int) -> int:
    """``default``, or the budget ``VFIOD_FUZZ_EXAMPLES`` names (a positive integer)."""
    raw = os.environ.get("VFIOD_FUZZ_EXAMPLES", "").strip()
    if not raw:
        return default
    n = int(raw)
    if n < 1:
        raise ValueError(f"VFIOD_FUZZ_EXAMPLES must be a positive integer, not {raw!r}")
    return n
