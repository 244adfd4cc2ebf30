"""``vfiod ctl status``: a guest's migration in one line (docs/architecture.md §6): where
it went or came from, its phase or result, the downtime predicted and measured, the
destination's share, and for a migration coordinated with QEMU's own (§8.3) its two
halves: QEMU's share of the downtime and the devices' share, and QEMU's own figures."""

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


def _fine_ms(s: float) -> str:
    """The destination's parts of the downtime are often under a millisecond."""
    return f"{s * 1000:.1f} ms"


def outcome_line(m: dict[str, Any]) -> str:
    """The migration record ``m`` (``status`` JSON) as text."""
    where = f"{'to' if m['role'] == 'source' else 'from'} {m['peer']}"
    if m["result"] is None:
        pr = m["progress"]
        return (f"{m['role']} {where}: {pr['phase']} iteration {pr['iteration']}, predicted "
                f"downtime {_ms(pr['predicted_downtime_s'])}")
    text = f"{m['result']} {where}"
    share = m.get("downtime_share")
    if m["result"] == "completed" and share:       # the destination: the source's report
        err = m.get("prediction_error")             # and its own part
        text += (f" (downtime {_ms(m['downtime_s'])}, predicted "
                 f"{_ms(m['predicted_downtime_s'])}, error "
                 f"{'-' if err is None else f'{err * 100:.0f}%'}; share here "
                 f"{_fine_ms(share['total_s'])}: load {_fine_ms(share['load_s'])}, verify "
                 f"{_fine_ms(share['verify_s'])}, resume {_fine_ms(share['resume_s'])}; "
                 f"verified {'yes' if m['verified'] else 'no'})")
    elif m["result"] == "completed":
        text += (f" (downtime {_ms(m['downtime_s'])}, predicted "
                 f"{_ms(m['predicted_downtime_s'])}{vmm_halves(m)}, verified "
                 f"{'yes' if m['verified'] else 'no'})")
    elif m["error"]:
        text += f": {m['error']}"
    return text
