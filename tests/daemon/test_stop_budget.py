"""A stop fits in the unit's ``TimeoutStopSec`` (daemon/stopping.py, docs/architecture.md §6):
the migrations' rollback budget plus the margin for the rest of the stop stays under the
time systemd waits before its SIGKILL, read from ``systemd/vfiod.service`` itself, so the
two cannot drift together again (the budget once equalled ``TimeoutStopSec``: a rollback
that used all of it was killed in the middle, with its devices half-way)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vfiod.daemon.main import Daemon
from vfiod.daemon.stopping import STOP_BUDGET_S, STOP_MARGIN_S

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "vfiod.service"
_SPAN_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
               "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
               "ms": 1e-3, "msec": 1e-3, "h": 3600.0, "hr": 3600.0, "hour": 3600.0}


def timespan_s(text: str) -> float:
    """A systemd time span (systemd.time(7)): "60s", "1min 30s", "90" (seconds)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip())
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", text):
        raise ValueError(f"not a time span: {text!r}")
    return sum(float(n) * _SPAN_UNITS[u] for n, u in parts)


def unit_setting(key: str) -> str:
    values = [line.split("=", 1)[1].strip() for line in UNIT.read_text().splitlines()
              if line.startswith(key + "=")]
    assert len(values) == 1, f"{UNIT} sets {key} {len(values)} times"
    return values[0]


@pytest.mark.parametrize("text, seconds", [("60s", 60), ("1min 30s", 90), ("90", 90),
                                           ("2min", 120), ("500ms", 0.5)])
def test_timespan(text: str, seconds: float) -> None:
    assert timespan_s(text) == seconds


def test_timespan_refuses_what_it_cannot_read() -> None:
    with pytest.raises((ValueError, KeyError)):
        timespan_s("infinity")


def test_budget_and_margin_fit_in_timeout_stop_sec() -> None:
    stop = timespan_s(unit_setting("TimeoutStopSec"))
    assert STOP_BUDGET_S + STOP_MARGIN_S < stop, (STOP_BUDGET_S, STOP_MARGIN_S, stop)
    # "well under": systemd's SIGKILL must never be the way a rollback ends
    assert STOP_BUDGET_S <= stop / 2


def test_the_daemon_stops_on_that_budget() -> None:
    assert Daemon.stop_budget_s == STOP_BUDGET_S
