"""What ``vfiod demo`` prints: the steps as an operator's shell would show them, the
migration's progress (from ``vfiod ctl migrate --json``, at most one line a second) and
a bounded summary, always ``SUMMARY_LINES`` lines, or one JSON object with ``--json``
(docs/architecture.md §1 steps 5-8: predicted and actual downtime, verification).

``DemoOutcome`` collects what the steps of ``demo_run`` learnt; ``summary_of`` turns it
into the summary object, which both forms print.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfiod.cli.demo_metrics import DemoScraper, pick
from vfiod.cli.demo_procs import DemoDaemon, DemoStepError, shown
from vfiod.cli.demo_setup import DEVICES, GUEST, GiB, MiB, ram_bytes

#: at most one progress line per this many seconds (a new phase and the outcome always show)
PROGRESS_EVERY_S = 1.0
#: metric samples the summary shows from during the migration (plus one after it)
SAMPLES_SHOWN = 3
#: samples ``--json`` keeps from during the migration (``scrapes`` counts them all)
SAMPLES_KEPT = 8
#: the human summary's length, whatever happened
SUMMARY_LINES = 16


@dataclass
class DemoOutcome:
    t0: float
    workdir: str = ""
    daemons: list[DemoDaemon] = field(default_factory=list)
    ready_s: float | None = None      # from the daemons' start
    migrate_command: str = ""
    migrate_exit: int | None = None
    migrate_s: float | None = None
    #: the source's last migration record, as ``vfiod ctl migrate --json`` printed it
    migration: dict[str, Any] | None = None
    scraper: DemoScraper | None = None
    #: ``vfiod ctl status vm1 --json`` of each daemon, by role
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    stops: dict[str, str] = field(default_factory=dict)
    #: ``vfiod kernels --json``, run before the daemons start
    kernels: dict[str, Any] | None = None
    removed: bool = False
    failed: DemoStepError | None = None
    total_s: float = 0.0


def _guest_now(outcome: DemoOutcome) -> dict[str, Any]:
    """The guest's state on each host per ``vfiod ctl status`` (None: not asked), and the
    one host it runs on (None: on neither, or not asked)."""
    states = {role: (outcome.status[role]["guests"][0]["state"] if role in outcome.status
                     else None) for role in ("source", "destination")}
    runs = [role for role, s in states.items() if s == "running"]
    return {**states, "runs_on": runs[0] if len(runs) == 1 else None}


def summary_of(outcome: DemoOutcome, args: argparse.Namespace) -> dict[str, Any]:
    m = outcome.migration or {}
    dst_m = (outcome.status.get("destination", {}).get("guests") or [{}])[0].get("migration")
    dst_m = dst_m if dst_m and dst_m.get("id") == m.get("id") else {}
    now = _guest_now(outcome)
    verified = m.get("verified") is True and dst_m.get("verified") is True
    scraper = outcome.scraper
    during = scraper.during_migration() if scraper else []
    failed = outcome.failed
    result = m.get("result") or "error"
    ok = (failed is None and result == "completed" and verified
          and now.get("runs_on") == "destination" and outcome.removed)
    return {
        "ok": ok,
        "result": result,
        "step": failed.step if failed else None,
        "reason": failed.message if failed else m.get("error"),
        "verified": verified,
        "migration_id": m.get("id"),
        "iterations": (m.get("progress") or {}).get("iteration"),
        "predicted_downtime_s": m.get("predicted_downtime_s"),
        "actual_downtime_s": m.get("downtime_s"),
        "prediction_error": m.get("prediction_error"),
        "downtime_limit_s": args.downtime_limit_ms / 1000,
        "downtime_breakdown": m.get("downtime_breakdown"),
        "destination_share": dst_m.get("downtime_share"),
        "bytes": {"sent": (m.get("progress") or {}).get("bytes_sent"),
                  "received": (dst_m.get("progress") or {}).get("bytes_received"),
                  "guest_ram": ram_bytes(args)},
        "guest_now": now,
        "daemons": {d.files.role: {"pid": d.pid, "control_socket": str(d.files.control_socket),
                                   "metrics": d.info.get("metrics"),
                                   "migration_listen": d.info.get("migration_listen"),
                                   "ready_s": d.ready_s,
                                   "stop": outcome.stops.get(d.files.role)}
                    for d in outcome.daemons},
        "commands": {"daemons": [shown(d.argv) for d in outcome.daemons],
                     "migrate": outcome.migrate_command or None,
                     "migrate_exit": outcome.migrate_exit},
        "metrics": {"interval_s": scraper.interval_s if scraper else None,
                    "scrapes": len(scraper.samples) if scraper else 0,
                    "during_migration": len(during),
                    "samples": pick(during, SAMPLES_KEPT),
                    "after": next((s for s in (scraper.samples if scraper else [])
                                   if s["when"] == "after"), None)},
        "warnings": list(m.get("warnings") or []),
        "workdir": outcome.workdir,
        "workdir_removed": outcome.removed,
        "kernels": outcome.kernels,
        "timings": {"kernels_s": (outcome.kernels or {}).get("seconds"),
                    "ready_s": outcome.ready_s, "migrate_s": outcome.migrate_s,
                    "total_s": outcome.total_s},
    }


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.1f} ms"


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def _sample_line(s: dict[str, Any] | None) -> str:
    if s is None:
        return "-"
    a, b = s["source"], s["destination"]
    src = (f"source {a['phase'] or 'idle'}, pass {_flag(a['iteration'])}, "
           f"predicted downtime {_ms(a['predicted_downtime_s'])}, RAM left "
           f"{_size(a['ram_remaining_bytes'])}"
           + (f", {a['bandwidth_bps'] / 1e6:.0f} MB/s" if a["bandwidth_bps"] else ""))
    return (f"t={s['t_s']:.2f} s  {src}; destination {b['phase'] or 'idle'}; guest running: "
            f"source {_flag(a['running'])}, destination {_flag(b['running'])}")


def _flag(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


class DemoPrinter:
    """Terminal output, or nothing but the summary's JSON object with ``--json``."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self._shown_at: float | None = None
        self._phase: str | None = None
        self.hidden = 0

    def line(self, text: str) -> None:
        if not self.as_json:
            print(text, flush=True)

    def intro(self, args: argparse.Namespace, workdir: Path) -> None:
        self.line(f"vfiod demo: guest {GUEST} ({ram_bytes(args) / GiB:.1f} GiB RAM, "
                  f"{args.fill_mib} MiB filled, device DMA writing {args.dirty_mbps:g} MB/s) "
                  "moves between two vfiod daemons on simulated hosts, driven as an "
                  "operator would")
        self.line(f"  {workdir}/{{source,destination}}/vfiod.toml: each host's "
                  "configuration (its state directory, control socket, metrics and migration "
                  "ports on 127.0.0.1)")
        for d in DEVICES:
            self.line(f"  {d.id:<6} {d.names[0]} -> {d.names[1]}: {d.describe}")

    def ready(self, d: DemoDaemon) -> None:
        i = d.info
        self.line(f"  {d.files.role} daemon pid {d.pid} ready after {d.ready_s:.1f} s: "
                  f"metrics {i['metrics']}, incoming migrations {i['migration_listen']}")

    def progress(self, m: dict[str, Any], t: float) -> None:
        """One ``vfiod ctl migrate --json`` record, ``t`` seconds into the migration."""
        if m["result"] is not None:
            self.line(f"  t={t:.1f} s  {m['result']}: downtime {_ms(m['downtime_s'])}, "
                      f"predicted {_ms(m['predicted_downtime_s'])}, verified "
                      f"{'yes' if m['verified'] else 'no'}"
                      + (f": {m['error']}" if m["error"] else ""))
            return
        pr = m["progress"]
        if (self._shown_at is not None and pr["phase"] == self._phase
                and t - self._shown_at < PROGRESS_EVERY_S):
            self.hidden += 1
            return
        self._shown_at, self._phase = t, pr["phase"]
        self.line(f"  t={t:.1f} s  {pr['phase']:<8} pass {pr['iteration']:>3}  sent "
                  f"{_size(pr['bytes_sent']):>9}  RAM left {_size(pr['ram_remaining_bytes']):>9}"
                  f"  predicted downtime {_ms(pr['predicted_downtime_s'])}  {pr['triple']}"
                  .rstrip())

    def summary(self, s: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(s), flush=True)
            return
        if s["step"]:
            print(f"vfiod demo: step '{s['step']}' failed: {s['reason']}", file=sys.stderr)
        for line in summary_lines(s):
            print(line)
        sys.stdout.flush()


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The human summary: ``SUMMARY_LINES`` lines, "-" where a step did not get that far."""
    d = s["daemons"]
    now = s["guest_now"]
    met = s["metrics"]
    err = s["prediction_error"]
    share = s["destination_share"]
    b = s["bytes"]
    if s["step"]:
        result = (f"{s['result']}, FAILED at step '{s['step']}' (the reason is above, on "
                  "stderr)")
    else:
        result = (f"{s['result']}" + (f": {s['reason']}" if s["reason"] else "")
                  + ("" if s["ok"] else "  (NOT OK: see below)"))

    def daemon(role: str) -> str:
        x = d.get(role) or {}
        return (f"{role} pid {x.get('pid') or '-'} (metrics {x.get('metrics') or '-'}, "
                f"incoming {x.get('migration_listen') or '-'})")

    if now["source"] is None and now["destination"] is None:
        where = "- (not asked)"
    else:
        where = (f"{GUEST} runs on the {now['runs_on']}" if now["runs_on"]
                 else f"{GUEST} runs on neither host")
        where += (f" (vfiod ctl status: source {now['source'] or '-'}, destination "
                  f"{now['destination'] or '-'})")
    samples = pick(met["samples"], SAMPLES_SHOWN)
    shown = [_sample_line(x) for x in samples] + ["-"] * (SAMPLES_SHOWN - len(samples))
    lines = [
        "summary:",
        f"  result        {result}",
        f"  daemons       {daemon('source')}, {daemon('destination')}",
        f"  migrate       {s['commands']['migrate'] or '-'} (exit "
        f"{'-' if s['commands']['migrate_exit'] is None else s['commands']['migrate_exit']})",
        f"  downtime      predicted {_ms(s['predicted_downtime_s'])}, actual "
        f"{_ms(s['actual_downtime_s'])}"
        + (f" (prediction error {err * 100:.0f}%)" if err is not None else "")
        + f", limit {s['downtime_limit_s'] * 1000:g} ms"
        + (f"; the destination's share {_ms(share['total_s'])}" if share else ""),
        f"  passes        {_passes(s['iterations'])}",
        f"  bytes         sent {_size(b['sent'])}, received {_size(b['received'])}, of "
        f"{_size(b['guest_ram'])} guest RAM (never-written pages are not sent)",
        f"  verification  the destination checked the RAM content digests: "
        f"{'verified' if s['verified'] else 'NOT verified'}",
        f"  guest now     {where}",
        f"  metrics       {met['scrapes']} scrapes of both daemons' /metrics, "
        f"{met['during_migration']} during the migration:",
        *(f"    {x}" for x in shown),
        f"    after: {_sample_line(met['after'])}",
        f"  stopped       source {(d.get('source') or {}).get('stop') or '-'}; destination "
        f"{(d.get('destination') or {}).get('stop') or '-'}; {s['workdir']} "
        f"{'removed' if s['workdir_removed'] else 'NOT removed'}",
        f"  took          {s['timings']['total_s']:.1f} s (numba kernels "
        f"{_secs(s['timings']['kernels_s'])}, daemons ready after "
        f"{_secs(s['timings']['ready_s'])}, migration {_secs(s['timings']['migrate_s'])})",
    ]
    assert len(lines) == SUMMARY_LINES, len(lines)
    return lines


def _passes(n: int | None) -> str:
    return "-" if n is None else f"{n} pre-copy pass{'' if n == 1 else 'es'}"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s"
