"""Shared pytest setup: numba's cache lives in the project (or $NUMBA_CACHE_DIR), and the
rigs in tests/support/ get pytest's assertion messages like the tests that use them."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "numba"))
# by module, not the package: ``make test`` loads tests.support.no_skips as a plugin first
pytest.register_assert_rewrite(*(f"tests.support.{p.stem}" for p in
                                 (Path(__file__).parent / "support").glob("*.py")
                                 if p.stem not in ("__init__", "no_skips")))
