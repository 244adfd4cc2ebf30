"""A daemon as a production install runs it, and its memory, for the RSS figures
(docs/benchmarks.md §2, RSS per guest): the test venv has pytest-cov, so ``coverage`` is
importable there and ``import numba`` imports it (numba/misc/coverage_support.py tries
``import coverage`` and carries on without it); a production install has no coverage.
``without_coverage`` gives a daemon a directory first on its path whose ``coverage.py``
raises ``ImportError``; ``coverage_mapped`` says from its maps whether coverage's C tracer
was loaded anyway; ``anon_rss`` is the memory the figures count."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from tests.support.daemons import REPO


@contextmanager
def without_coverage() -> Iterator[dict[str, str]]:
    """The environment (``PYTHONPATH``) of a daemon that cannot import ``coverage``."""
    with tempfile.TemporaryDirectory(prefix="vfiod-bench-nocov-") as tmp:
        Path(tmp, "coverage.py").write_text(
            'raise ImportError("coverage is not installed (a production install)")\n')
        yield {"PYTHONPATH": f"{tmp}:{REPO}"}


def coverage_mapped(pid: int) -> bool:
    """Whether coverage's C tracer is mapped into process ``pid`` (``import coverage`` ran)."""
    with open(f"/proc/{pid}/maps") as f:
        return any("/coverage/" in line for line in f)


def anon_rss(pid: int) -> int:
    """The process's anonymous resident memory (RSS less file and shmem pages). Guest RAM
    is shared memory (memfd, a VMM's file): a migration reading it makes it resident in the
    source's RSS without the daemon holding any more memory of its own."""
    m = psutil.Process(pid).memory_info()
    return int(m.rss - m.shared)
