"""What ``vfiod demo`` does (the command, its options and its output are described in
``vfiod/cli/demo_cmd.py``): the product assembled the way an operator assembles it, then
one migration driven through it (docs/architecture.md §1 steps 5-8, §6).

The steps, each named in the message if it fails:

1. write both hosts' configurations into a fresh temporary directory (``demo_setup``),
   and run ``vfiod kernels --json`` (numba's kernels compiled into its cache or loaded
   from it, in a process of their own, as the systemd unit does before its daemon);
2. start both daemons with ``vfiod run --backend sim --config FILE`` and wait until each
   answers ``status`` (``demo_procs``);
3. run ``vfiod ctl migrate vm1 --to 127.0.0.1:PORT --json`` against the source and follow
   its output, scraping both daemons' ``/metrics`` every ``SCRAPE_EVERY_S`` meanwhile
   (``demo_metrics``);
4. ask both daemons where the guest runs now with ``vfiod ctl status vm1 --json``;
5. stop both daemons with SIGTERM (SIGKILL past a deadline) and remove the directory:
   always, whatever failed before;
6. print the bounded summary (``demo_report``).

Exit status 0 when every step worked, the migration completed, the destination verified
it and the guest runs there; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from vfiod.cli.demo_metrics import DemoScraper
from vfiod.cli.demo_procs import (
    DemoDaemon,
    DemoStepError,
    child_env,
    kill_quietly,
    shown,
    vfiod_argv,
)
from vfiod.cli.demo_report import DemoOutcome, DemoPrinter, summary_of
from vfiod.cli.demo_setup import GUEST, check_args, sim_hosts

SCRAPE_EVERY_S = 0.25
MIGRATE_STEP = "vfiod ctl migrate"
KERNELS_STEP = "vfiod kernels"
#: an empty cache compiles in about 10 s on 2 cores; a loaded machine takes longer
KERNELS_TIMEOUT_S = 300.0
STATUS_STEP = "vfiod ctl status"
#: the migration's deadline beyond its own --timeout (the switchover and the commit)
MIGRATE_MARGIN_S = 120.0
#: how long the destination may take to say the guest runs there after ctl returned
SETTLE_TIMEOUT_S = 30.0


def run(args: argparse.Namespace) -> int:
    check_args(args)                    # usage errors, before anything starts
    out = DemoPrinter(args.json)
    outcome = DemoOutcome(t0=time.monotonic())
    workdir = Path(tempfile.mkdtemp(prefix="vfiod-demo-"))
    outcome.workdir = str(workdir)
    daemons: list[DemoDaemon] = []
    try:
        try:
            src_files, dst_files = sim_hosts(workdir, args)
        except OSError as e:
            raise DemoStepError("write the configurations", str(e)) from None
        daemons = [DemoDaemon(src_files), DemoDaemon(dst_files)]
        outcome.daemons = daemons
        out.intro(args, workdir)
        outcome.kernels = _warm_kernels(out)
        started = time.monotonic()
        for d in daemons:
            try:
                d.start()
            except OSError as e:
                raise DemoStepError(d.step, f"{shown(d.argv)}: {e}") from None
            out.line(f"$ {shown(d.argv)} &")
        for d, state in zip(daemons, ("running", "incoming"), strict=True):
            d.wait_ready(state)
            out.ready(d)
        outcome.ready_s = time.monotonic() - started
        _migrate(args, daemons[0], daemons[1], outcome, out)
        _where_now(daemons, outcome, out)
        m = outcome.migration or {}
        if m.get("result") != "completed" or outcome.migrate_exit != 0:
            raise DemoStepError(MIGRATE_STEP, f"the migration ended {m.get('result') or 'without an outcome'}"
                                + (f": {m['error']}" if m.get("error") else "")
                                + f" (exit status {outcome.migrate_exit})")
    except DemoStepError as e:
        outcome.failed = e
    finally:
        for d in daemons:
            outcome.stops[d.files.role] = d.stop()
            if d.exit not in (0, None) and outcome.failed is None:
                outcome.failed = DemoStepError("stop the daemons", f"the {d.files.role} "
                                               f"daemon: {outcome.stops[d.files.role]}"
                                               + d.log_tail())
        shutil.rmtree(workdir, ignore_errors=True)
        outcome.removed = not workdir.exists()
    outcome.total_s = time.monotonic() - outcome.t0
    summary = summary_of(outcome, args)
    out.summary(summary)
    return 0 if summary["ok"] else 1


def _migrate(args: argparse.Namespace, src: DemoDaemon, dst: DemoDaemon,
             outcome: DemoOutcome, out: DemoPrinter) -> None:
    """Step 3: ``vfiod ctl migrate`` as a process, followed line by line (one JSON object
    per progress update, the outcome last), both endpoints scraped meanwhile."""
    argv = vfiod_argv("ctl", "--socket", str(src.files.control_socket), "migrate", GUEST,
                      "--to", dst.info["migration_listen"],
                      "--downtime-limit", f"{args.downtime_limit_ms:g}",
                      "--timeout", f"{args.timeout:g}", "--on-timeout", args.on_timeout,
                      "--json")
    outcome.migrate_command = shown(argv)
    out.line(f"$ {outcome.migrate_command}")
    scraper = DemoScraper(src.info["metrics"], dst.info["metrics"], SCRAPE_EVERY_S,
                          time.monotonic())
    outcome.scraper = scraper
    errors = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors,
                            stdin=subprocess.DEVNULL, env=child_env(), start_new_session=True)
    try:
        records = _follow(proc, scraper, args.timeout + MIGRATE_MARGIN_S, out)
        outcome.migrate_exit = proc.wait()
        scraper.take("after")
    finally:
        kill_quietly(proc)
        errors.seek(0)
        said = errors.read().decode(errors="replace").strip()
        errors.close()
    outcome.migrate_s = time.monotonic() - scraper.t0
    if not records:
        raise DemoStepError(MIGRATE_STEP, f"{outcome.migrate_command} printed no outcome "
                            f"(exit status {outcome.migrate_exit}): {said[-1000:]}"
                            + src.log_tail())
    outcome.migration = records[-1]


def _follow(proc: subprocess.Popen[bytes], scraper: DemoScraper, timeout: float,
            out: DemoPrinter) -> list[dict[str, Any]]:
    """Read ``proc``'s JSON lines until it exits, scraping whenever a scrape is due."""
    assert proc.stdout is not None
    stream: IO[bytes] = proc.stdout
    deadline = time.monotonic() + timeout
    records: list[dict[str, Any]] = []
    pending = b""
    while True:
        if scraper.due() == 0:
            scraper.take()
        left = deadline - time.monotonic()
        if left <= 0:
            raise DemoStepError(MIGRATE_STEP, f"still running after {timeout:g} s")
        ready, _, _ = select.select([stream], [], [], min(left, scraper.due()))
        if not ready:
            continue
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            return records
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)["migration"]
            except (ValueError, KeyError, TypeError):
                raise DemoStepError(MIGRATE_STEP, f"unexpected output: {line[:300]!r}"
                                    ) from None
            records.append(rec)
            out.progress(rec, time.monotonic() - scraper.t0)


def _warm_kernels(out: DemoPrinter) -> dict[str, Any]:
    """Step 1's second half: ``vfiod kernels``, as the systemd unit runs it before its
    daemon: numba's kernels compiled into the cache, or loaded from it, in a process of
    their own. A cache an install left empty would otherwise be filled inside the
    migration, whose setup then waits 8-12 s on the compiler (``kernels_cmd.py``)."""
    argv = vfiod_argv("kernels", "--json")
    out.line(f"$ {shown(argv)}")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=child_env(),
                              stdin=subprocess.DEVNULL, timeout=KERNELS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DemoStepError(KERNELS_STEP, f"{shown(argv)}: no answer within "
                                          f"{KERNELS_TIMEOUT_S:.0f} s") from None
    except OSError as e:
        raise DemoStepError(KERNELS_STEP, f"{shown(argv)}: {e}") from None
    try:
        if proc.returncode != 0:
            raise ValueError(f"exit status {proc.returncode}")
        done = dict(json.loads(proc.stdout))
        seconds, compiled = float(done["seconds"]), list(done["compiled"])
    except (ValueError, KeyError, TypeError) as e:
        said = (proc.stdout + proc.stderr).strip()[-1000:]
        raise DemoStepError(KERNELS_STEP, f"{shown(argv)} ({e}): {said}") from None
    out.line(f"  numba kernels ready in {seconds:.1f} s ("
             + (f"{len(compiled)} compiled: the cache lacked them" if compiled
                else "loaded from the cache") + ")")
    return done


def _where_now(daemons: list[DemoDaemon], outcome: DemoOutcome, out: DemoPrinter) -> None:
    """Step 4: the guest's state on each host, per ``vfiod ctl status``, once the
    destination has settled (its commit may end a moment after the source's report)."""
    if outcome.migration is not None and outcome.migration.get("result") == "completed":
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline and not _settled(daemons[1]):
            time.sleep(0.1)       # the poll interval of a bounded wait
    for d in daemons:
        out.line(f"$ vfiod ctl --socket {d.files.control_socket} status {GUEST} --json")
        outcome.status[d.files.role] = d.ctl("status", GUEST, step=STATUS_STEP)


def _settled(dst: DemoDaemon) -> bool:
    g = dst.status(STATUS_STEP)["guests"][0]
    return bool(g["state"] == "running" and g["migration"] and g["migration"]["result"])
