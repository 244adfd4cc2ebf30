"""Shared pytest setup: numba's cache lives in the project (or $NUMBA_CACHE_DIR)."""

import os
from pathlib import Path

os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "numba"))
