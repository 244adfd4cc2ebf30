"""``vfiod ctl status`` lines and metrics for observed devices (vfiod/cli/observed_render.py,
vfiod/daemon/metrics.py, docs/architecture.md §8.5): a state, an unknown text kept as
debugfs said it, a reason; one state marked 1 per device."""

from __future__ import annotations

import io

from prometheus_client import CollectorRegistry, generate_latest

from vfiod.cli.observed_render import write_observed
from vfiod.daemon.metrics import VfiodCollector
from vfiod.daemon.registry import Registry


def _row(**kw: object) -> dict[str, object]:
    return {"device": "0000:3b:00.2", "owner": None, "state": "STOP_COPY", "raw": "STOP_COPY",
            "readable": True, "problem": None, "reason": "", "read_at": 0.0, "age_s": 0.25,
            **kw}


def test_rows_say_state_age_and_reason() -> None:
    out = io.StringIO()
    write_observed([_row(owner="vm7"),
                    _row(state="unknown", raw="Invalid",
                         reason="debugfs says 'Invalid', not a state this vfiod knows"),
                    _row(state=None, readable=False, problem="no-debugfs",
                         reason="debugfs is not mounted at /sys/kernel/debug")], out)
    lines = out.getvalue().splitlines()
    assert lines[1] == "observed (owned by another VMM; state read from debugfs, never touched):"
    assert "owner vm7" in lines[2] and "STOP_COPY" in lines[2] and lines[2].endswith(
        "read 0.2 s ago")
    assert "unknown" in lines[3] and "'Invalid'" in lines[3]
    assert lines[4].endswith("unreadable (no-debugfs), read 0.2 s ago: debugfs is not "
                             "mounted at /sys/kernel/debug")


def test_nothing_observed_writes_nothing() -> None:
    out = io.StringIO()
    write_observed([], out)
    assert out.getvalue() == ""


def test_metrics_mark_one_state_per_device_and_unknown_text() -> None:
    reg = CollectorRegistry(auto_describe=False)
    rows = [_row(), _row(device="0000:3b:00.3", state="unknown", raw="Invalid"),
            _row(device="0000:3b:00.4", state=None, readable=False, problem="denied")]
    reg.register(VfiodCollector(Registry(), backend="sim", pinned_bytes=lambda: 0,
                                observed=lambda: rows))
    ones = [line for line in generate_latest(reg).decode().splitlines()
            if line.startswith("vfiod_observed_device_migration_state") and line.endswith(" 1.0")]
    assert ones == [
        'vfiod_observed_device_migration_state{device="0000:3b:00.2",state="STOP_COPY"} 1.0',
        'vfiod_observed_device_migration_state{device="0000:3b:00.3",state="unknown"} 1.0']
    text = generate_latest(reg).decode()
    assert 'vfiod_observed_device_readable{device="0000:3b:00.4"} 0.0' in text
    assert text.count('vfiod_observed_device_migration_state{device="0000:3b:00.4"') == 9
