"""``make demo-qemu``: the migration of a running Linux VM between two real QEMU 7.2,
coordinated with two vfiod daemons, as an operator would run it (docs/architecture.md
§8.3; README "Using vfiod with QEMU").

It boots the QEMU VM tier's guest (the kernel tier's Debian kernel, the counter-per-page
workload as init) from a shared RAM file, starts a destination QEMU with ``-S``, starts
two ``vfiod run --backend sim`` daemons whose simulated device DMA-writes the guest's
reserved range, runs ``vfiod ctl migrate``, scrapes both daemons' ``/metrics`` while it
runs, and prints a bounded summary: both halves of the downtime, where the workload runs
now, and whether the destination's RAM holds what the source had. Everything it started
is stopped at the end, whatever happened. Needs QEMU and gcc (``make deps``); the first
run downloads the Debian kernel package (cached under ``$VFIOD_CACHE``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.qemu.test_qemu_vfiod import RAM_MIB, _config
from tests.support.daemons import daemon_pair, guest_status, vfiod_cmd, wait_until
from tests.support.qemu.assets import prepare_qemu_guest
from tests.support.qemu.guest import QemuGuest
from tests.support.qemu.pages import workload_pages
from vfiod.cli.demo_metrics import DemoScraper, pick

#: at most this many metrics samples in the summary
SAMPLES = 6


def _span(vm: QemuGuest) -> np.ndarray:
    assert vm.ram_path is not None
    ram = np.memmap(vm.ram_path, dtype=np.uint8, mode="r")
    return np.array(ram[vm.reserved_offset:vm.reserved_offset + vm.reserved_size])


def run(workdir: Path) -> dict[str, Any]:
    assets = prepare_qemu_guest()
    src, dst = QemuGuest(assets, workdir / "src", "src"), QemuGuest(assets, workdir / "dst",
                                                                     "dst")
    out: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        src.start(workdir / "src.ram", RAM_MIB)
        src.wait_generation_above(0, 60)
        out["boot_s"] = round(time.monotonic() - t0, 2)
        dst.start(workdir / "dst.ram", RAM_MIB, incoming=0)
        with daemon_pair(_config("source", src, "vm1"), _config("destination", dst, "vm1"),
                         "demo-src", "demo-dst") as (vs, vd):
            wait_until(lambda: _span(src).any(), 30, "the device to write its range")
            before = src.last_generation()
            scraper = DemoScraper(vs.metrics_address, vd.metrics_address, 0.1, time.monotonic())
            ctl = subprocess.Popen(vfiod_cmd("ctl", "--socket", vs.socket, "migrate", "vm1",
                                             "--to", vd.migration_address, "--json"),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            while ctl.poll() is None:
                scraper.take()
                try:                        # until the next scrape, or ctl's end if sooner
                    ctl.wait(timeout=scraper.due())
                except subprocess.TimeoutExpired:
                    pass
            stdout, stderr = ctl.communicate()
            final = json.loads(stdout.strip().splitlines()[-1])["migration"]
            out["migration"] = final
            out["ctl_exit"] = ctl.returncode
            if final.get("result") == "completed":
                out["destination_generation"] = dst.wait_generation_above(
                    src.last_generation() + 2, 30)
            out["source_generation"] = {"before": before, "at_pause": src.last_generation()}
            assert src.qmp is not None and dst.qmp is not None
            out["qemu_status"] = {"source": src.qmp.execute("query-status")["status"],
                                  "destination": dst.qmp.execute("query-status")["status"]}
            out["device_range_equal"] = bool(np.array_equal(_span(src), _span(dst)))
            assert src.ram_path is not None and dst.ram_path is not None
            mine, theirs = workload_pages(src.ram_path), workload_pages(dst.ram_path)
            out["vcpu_pages_not_older"] = bool(mine) and all(
                theirs.get(i, -1) >= c for i, c in mine.items())
            out["guest_now"] = {"source": guest_status(vs, "vm1")["state"],
                                "destination": guest_status(vd, "vm1")["state"]}
            out["metrics"] = pick(scraper.during_migration(), SAMPLES)
            out["ok"] = (final.get("result") == "completed" and out["device_range_equal"]
                         and out["vcpu_pages_not_older"]
                         and out["qemu_status"]["source"] == "postmigrate")
            if not out["ok"]:
                out["stderr"] = stderr[-2000:]
    finally:
        src.kill()
        dst.kill()
    return out


def _ms(s: Any) -> str:
    return f"{s * 1000:.0f} ms" if isinstance(s, int | float) else "-"


def summary(out: dict[str, Any]) -> list[str]:
    m = out.get("migration") or {}
    vmm = m.get("vmm") or {}
    act, pred, own = vmm.get("actual") or {}, vmm.get("predicted") or {}, vmm.get(
        "completed") or {}
    lines = [
        f"result        {m.get('result')} ({'ok' if out.get('ok') else 'NOT OK'}), booted in "
        f"{out.get('boot_s')} s",
        f"downtime      {_ms(m.get('downtime_s'))} end to end (predicted "
        f"{_ms(m.get('predicted_downtime_s'))})",
        f"  QEMU share  {_ms(act.get('vmm_s'))} (predicted {_ms(pred.get('vmm_s'))}); "
        f"QEMU's own downtime {_ms(own.get('downtime_s'))}, total {_ms(own.get('total_s'))}",
        f"  devices     {_ms(act.get('devices_s'))} (predicted {_ms(pred.get('devices_s'))})",
        f"workload      source generation {out.get('source_generation')}; destination at "
        f"{out.get('destination_generation')}",
        f"QEMU          {out.get('qemu_status')}",
        f"vfiod         {out.get('guest_now')}",
        f"RAM           device range equal: {out.get('device_range_equal')}; vCPU pages "
        f"on the destination at least as new: {out.get('vcpu_pages_not_older')}",
        "metrics       (source: phase, predicted downtime; destination: phase)"]
    for s in out.get("metrics", []):
        lines.append(f"  t={s['t_s']:.2f} s  {s['source']['phase']}, "
                     f"{_ms(s['source']['predicted_downtime_s'])}; "
                     f"{s['destination']['phase']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make demo-qemu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vfiod-demo-qemu-") as d:
        out = run(Path(d))
    if args.json:
        print(json.dumps(out, sort_keys=True, default=str))
    else:
        print("\n".join(summary(out)))
    return 0 if out.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
