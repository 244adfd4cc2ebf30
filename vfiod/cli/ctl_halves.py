"""``vfiod ctl status``: the two halves of a migration coordinated with QEMU's own
(docs/architecture.md §8.3), as one line part: QEMU's share of the downtime and the
devices' share, each measured and predicted, and QEMU's own figures."""

from __future__ import annotations

from typing import Any


def _ms(s: Any) -> str:
    return f"{s * 1000:.0f} ms" if isinstance(s, int | float) else "-"


def vmm_halves(m: dict[str, Any]) -> str:
    """``""`` when the migration was vfiod's alone."""
    vmm = m.get("vmm")
    if not vmm:
        return ""
    actual, predicted = vmm.get("actual") or {}, vmm.get("predicted") or {}
    text = (f"; QEMU share {_ms(actual.get('vmm_s'))} (predicted "
            f"{_ms(predicted.get('vmm_s'))}), devices' share {_ms(actual.get('devices_s'))} "
            f"(predicted {_ms(predicted.get('devices_s'))})")
    done = vmm.get("completed")
    if done:
        text += (f"; QEMU's own: downtime {_ms(done.get('downtime_s'))}, total "
                 f"{_ms(done.get('total_s'))}")
    return text
