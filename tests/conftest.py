"""Shared pytest setup: numba's cache lives in the project (or $NUMBA_CACHE_DIR), and the
rigs in tests/support/ get pytest's assertion messages like the tests that use them."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "numba"))
pytest.register_assert_rewrite("tests.support")
