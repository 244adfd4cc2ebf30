"""What ``vfiod demo`` does (the command, its options and its output are described in
``vfiod/cli/demo_cmd.py``): build the simulated source or destination side, run the
workload and the migration, print progress and the summary."""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vfiod.cli.demo_setup import DMA_POOL, DemoSide, GiB, MiB, build_side
from vfiod.kernel.sim.workload import Workload, WorkloadConfig, fill
from vfiod.migration.planning.linkprior import link_prior
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import MigrationResult, SessionConfig
from vfiod.migration.session.dest import DestinationSession
from vfiod.migration.session.digest import full_ram_digest
from vfiod.migration.session.link import ThrottledLink
from vfiod.migration.session.source import SourceSession
from vfiod.migration.session.status import IterationProgress, format_progress_line
from vfiod.migration.states import MigrationState
from vfiod.migration.transport import Listener, connect


def _ram_bytes(args: argparse.Namespace) -> int:
    n = int(args.ram_gib * GiB) // (2 * MiB) * (2 * MiB)
    if n < 4 * DMA_POOL:
        raise SystemExit(f"vfiod demo: --ram-gib {args.ram_gib} is too small "
                         f"(at least {4 * DMA_POOL / GiB:.3f})")
    if not 0 <= args.fill_mib * MiB <= n - DMA_POOL:
        raise SystemExit(f"vfiod demo: --fill-mib {args.fill_mib} does not fit the RAM")
    return n


#: passes kept in the result's history (the last ones): ``--json`` stays far under 64 KiB
#: however many passes ran (``iterations`` still counts them all)
HISTORY_KEPT = 40
#: at most one progress line per this many seconds (the first and the last always show)
PROGRESS_EVERY_S = 1.0


def _config(args: argparse.Namespace) -> SessionConfig:
    return SessionConfig(policy=Policy(downtime_limit_s=args.downtime_limit_ms / 1000,
                                       max_iterations=args.max_iterations,
                                       timeout_s=args.timeout, on_timeout=args.on_timeout),
                         ack_timeout_s=60.0, history_limit=HISTORY_KEPT)


def run(args: argparse.Namespace) -> int:
    ram = _ram_bytes(args)
    with tempfile.TemporaryDirectory(prefix=f"vfiod-demo-{args.role}-") as tmp:
        if args.role == "destination":
            return _destination(args, Path(tmp), ram)
        return _source(args, Path(tmp), ram)


# -- destination process ---------------------------------------------------------------
def _destination(args: argparse.Namespace, root: Path, ram: int) -> int:
    side = build_side("destination", root, ram)
    try:
        with Listener("127.0.0.1", args.port) as lst:
            print(f"PORT {lst.address[1]}", flush=True)
            with lst.accept(timeout=120) as conn:
                res = DestinationSession(side.guest, conn, host=side.facts,
                                         config=_config(args)).run()
        t0 = time.monotonic()
        audit = _audit(side)
        out = {"result": res.to_dict(), "audit": audit,
               "audit_s": time.monotonic() - t0, "pid": os.getpid()}
        print(json.dumps(out), flush=True)
        return 0 if res.result == "completed" else 1
    finally:
        side.close()


def _audit(side: DemoSide) -> dict[str, Any]:
    g = side.guest
    return {"ram": [r.to_dict() for r in full_ram_digest(side.host.kernel, g.ram)],
            "models": side.models()}


# -- source process --------------------------------------------------------------------
class _Dest:
    """The destination process: started first, its port read from its first line."""

    def __init__(self, args: argparse.Namespace) -> None:
        cmd = [sys.executable, "-m", "vfiod.cli.main", "demo", "--role", "destination",
               "--port", "0", "--ram-gib", str(args.ram_gib), "--fill-mib",
               str(args.fill_mib), "--downtime-limit-ms", str(args.downtime_limit_ms),
               "--timeout", str(args.timeout), "--on-timeout", args.on_timeout]
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True)

    def port(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("PORT "):
                return int(line.split()[1])
        raise RuntimeError(f"destination process did not report its port within "
                           f"{timeout:g} s: {self.errors()}")

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"destination process still running after {timeout:g} s; "
                               "killed") from None
        for line in reversed(out.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"destination process printed no result (exit "
                           f"{self.proc.returncode}): {self.errors()}")

    def errors(self) -> str:
        self.stderr.seek(0)
        text = self.stderr.read().decode(errors="replace").strip()
        return text[-2000:] or "(no stderr)"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def _source(args: argparse.Namespace, root: Path, ram: int) -> int:
    t_begin = time.monotonic()
    out = _Printer(args.json)
    dest = _Dest(args)
    side: DemoSide | None = None
    workload: Workload | None = None
    try:
        side = build_side("source", root, ram)
        t0 = time.monotonic()
        extents = fill(side.guest.ram[0].view(), args.fill_mib * MiB, seed=args.seed)
        fill_s = time.monotonic() - t0
        workload = Workload(side.host, side.workload_targets(),
                            WorkloadConfig(dirty_rate_bps=args.dirty_mbps * 1e6,
                                           seed=args.seed))
        side.guest.add_run_state_handler(workload.on_run_state)
        out.intro(side, ram, args, len(extents))
        port = dest.port(timeout=60)
        out.line(f"destination: process {dest.proc.pid} listening on 127.0.0.1:{port}")
        workload.start()
        models: list[str] = []

        def on_state(old: MigrationState, new: MigrationState) -> None:
            if new is MigrationState.COMPLETED:     # device state final; not yet released
                models.extend(side.models())
            out.line(f"migration state: {old.name} -> {new.name}   "
                     f"{session.status().triple}")

        with connect("127.0.0.1", port, timeout=30) as conn:
            link = (ThrottledLink(conn, args.bandwidth_mbps * 1e6) if args.bandwidth_mbps
                    else conn)
            session = SourceSession(side.guest, link, host=side.facts, config=_config(args),
                                    progress=out.progress,
                                    link_prior=link_prior("127.0.0.1"))
            session.add_state_handler(on_state)
            res = session.run()
        workload.stop()
        t0 = time.monotonic()
        mine = _audit(side)
        mine["models"] = models or mine["models"]
        audit_s = time.monotonic() - t0
        remote = dest.result(timeout=120)
        summary = _summary(res, remote, mine, workload, args, ram, fill_s, audit_s,
                           time.monotonic() - t_begin)
    except Exception as e:
        # the demo itself broke (not the migration, whose failures are results)
        summary = {"result": "error", "verified": False, "iterations": 0,
                   "predicted_downtime_s": None, "actual_downtime_s": None,
                   "reason": f"{type(e).__name__}: {e}", "destination_stderr": dest.errors()}
        if workload is not None:
            try:
                workload.stop()
            except TimeoutError:
                pass
    finally:
        dest.close()
        if side is not None:
            side.close()
    out.summary(summary)
    return 0 if summary["result"] == "completed" and summary["verified"] else 1


def _summary(res: MigrationResult, remote: dict[str, Any], mine: dict[str, Any],
             workload: Workload, args: argparse.Namespace, ram: int, fill_s: float,
             audit_s: float, total_s: float) -> dict[str, Any]:
    dres = remote.get("result", {})
    theirs = remote.get("audit", {})
    ram_equal = mine["ram"] == theirs.get("ram")
    models_equal = bool(mine["models"]) and mine["models"] == theirs.get("models")
    dv = dres.get("verification", {})
    t = res.timings
    dt = dres.get("timings", {})
    in_downtime = (t.get("source_final_rehash_s", 0.0) + dt.get("dest_final_rehash_s", 0.0)
                   + dt.get("dest_compare_s", 0.0))
    dest_verified = bool(res.verified) and dres.get("verified") is True
    return {
        "result": res.result,
        "reason": res.reason,
        "verified": bool(dest_verified and ram_equal and models_equal),
        "iterations": res.iterations,
        "predicted_downtime_s": res.predicted_downtime_s,
        "actual_downtime_s": res.actual_downtime_s,
        "prediction_error": res.prediction_error,
        "downtime_breakdown": res.downtime_breakdown,
        "downtime_limit_s": args.downtime_limit_ms / 1000,
        "forced": bool(res.history and res.history[-1].decision == "force"),
        "bytes": {"ram": res.ram_bytes_sent, "device": res.device_bytes_sent,
                  "stream": res.stream_bytes,
                  "zero_pages_skipped": res.verification.get("zero_pages_skipped", 0)},
        "guest": {"ram_bytes": ram, "filled_bytes": args.fill_mib * MiB,
                  "note": f"{ram / GiB:.1f} GiB of sparse memfd RAM; {args.fill_mib} MiB "
                          "filled with data, the rest never written (holes, not sent)"},
        "workload": workload.stats(),
        "verification": {
            "destination_verified": dest_verified,
            "manifest": dv.get("manifest"),
            "content_digests_match": dv.get("content_verified"),
            "regions": dv.get("regions"),
            "in_downtime_s": in_downtime,
            "during_precopy_s": (res.verification.get("source_hash_total_s", 0.0)
                                 + dv.get("hash_total_s", 0.0) - in_downtime),
            "final_rehash_pages": dv.get("final_rehash_pages"),
        },
        "audit": {"ram_equal": ram_equal, "device_models_equal": models_equal,
                  "source_s": audit_s, "destination_s": remote.get("audit_s")},
        "rollback": res.rollback,
        "warnings": res.warnings + dres.get("warnings", []),
        "timings": {**{f"source_{k}": v for k, v in t.items()},
                    **{f"destination_{k}": v for k, v in dt.items()},
                    "fill_s": fill_s, "demo_total_s": total_s},
        "history": [p.to_dict() for p in res.history],
        "history_omitted": res.iterations - len(res.history),
    }


class _Printer:
    """Terminal output (or nothing but the final JSON with ``--json``). Progress lines are
    rate-limited to one per ``every_s`` by ``clock``: a pass that decides (switchover,
    force, cancel) and the first always show; the others are counted and said."""

    def __init__(self, as_json: bool, *, every_s: float = PROGRESS_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.as_json = as_json
        self.every_s = every_s
        self.clock = clock
        self._shown_at: float | None = None
        self.hidden = 0

    def line(self, text: str) -> None:
        if not self.as_json:
            print(text, flush=True)

    def intro(self, side: DemoSide, ram: int, args: argparse.Namespace, extents: int) -> None:
        self.line(f"vfiod demo: guest vm1 on a simulated VFIO kernel: {ram / GiB:.1f} GiB RAM "
                  f"(sparse memfds; {args.fill_mib} MiB filled with data in {extents} "
                  "extents, the rest never written)")
        for d in side.devices:
            self.line(f"  {d.role:<6} {d.spec.name:<38} container {d.container}: {d.describe}")
        self.line(f"  workload: device DMA into guest RAM at {args.dirty_mbps:g} MB/s; "
                  f"downtime limit {args.downtime_limit_ms:g} ms"
                  + (f"; link capped at {args.bandwidth_mbps:g} MB/s"
                     if args.bandwidth_mbps else ""))

    def progress(self, p: IterationProgress) -> None:
        now = self.clock()
        if (self._shown_at is not None and p.decision == "continue"
                and now - self._shown_at < self.every_s):
            self.hidden += 1
            return
        self._shown_at = now
        skipped, self.hidden = self.hidden, 0
        self.line(format_progress_line(p)
                  + (f"  (+{skipped} pass{'es' if skipped > 1 else ''} not shown)"
                     if skipped else ""))

    def summary(self, s: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(s), flush=True)
            return
        if s["result"] == "error":
            print(f"vfiod demo failed: {s['reason']}", file=sys.stderr)
            print(f"destination process said: {s['destination_stderr']}", file=sys.stderr)
            return
        mib = 1 << 20
        v = s["verification"]
        man = v.get("manifest") or {}
        err = s["prediction_error"]

        def ms(x: float | None) -> str:
            return "-" if x is None else f"{x * 1000:.1f} ms"

        print("summary:")
        print(f"  result        {s['result']}" + (" (switchover forced by the timeout "
                                                   "policy)" if s["forced"] else "")
              + (f": {s['reason']}" if s["reason"] else ""))
        print(f"  iterations    {s['iterations']}")
        b = s["bytes"]
        print(f"  bytes         RAM {b['ram'] / mib:.1f} MiB, device {b['device'] / mib:.2f} "
              f"MiB, stream {b['stream'] / mib:.1f} MiB; {b['zero_pages_skipped']} "
              "never-written pages skipped")
        print(f"  downtime      predicted {ms(s['predicted_downtime_s'])}, actual "
              f"{ms(s['actual_downtime_s'])}"
              + (f" (prediction error {err * 100:.0f}%)" if err is not None else "")
              + f", limit {ms(s['downtime_limit_s'])}")
        assumed = s["history"][-1]["assumed_dirty_bytes"] if s["history"] else 0
        if assumed:
            print(f"                the prediction counts {assumed / mib:.0f} MiB of the "
                  "opted-out device's window as dirty (it is not asked until "
                  "stop-and-copy): an upper bound")
        if s["result"] != "completed":
            for dev, r in s["rollback"].items():
                print(f"  rolled back   {dev}: {r.get('state')}"
                      + (f" ({r['error']})" if r.get("error") else ""))
            for w in s["warnings"]:
                print(f"  warning       {w}")
            print("  verified      false (nothing migrated; the guest runs on at the source)")
            return
        print(f"  destination   manifest {'verified' if man.get('verified') else 'NOT verified'}"
              f" ({man.get('records', '?')} records); RAM content digests "
              f"{'match' if v.get('content_digests_match') else 'DIFFER'}; verification took "
              f"{ms(v['in_downtime_s'])} of the downtime ({v.get('final_rehash_pages')} "
              f"pages re-hashed at the end) and {ms(v['during_precopy_s'])} during pre-copy")
        a = s["audit"]
        print(f"  audit         full RAM digest {'equal' if a['ram_equal'] else 'DIFFERENT'}; "
              f"device states {'equal' if a['device_models_equal'] else 'DIFFERENT'} "
              "(after the migration, out of the downtime window)")
        for w in s["warnings"]:
            print(f"  warning       {w}")
        print(f"  verified      {str(s['verified']).lower()}")
        print(f"  took          {s['timings']['demo_total_s']:.1f} s")
