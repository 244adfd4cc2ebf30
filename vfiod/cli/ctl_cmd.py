"""``vfiod ctl``: the operator's client of the control socket (docs/architecture.md §6). It imports
only ``vfiod.api`` (the protocol), never the daemon.

Every subcommand prints for people by default and one JSON object with ``--json`` (the
daemon's answer as it is, for scripts). ``watch`` and ``migrate`` draw a live progress bar
with the predicted downtime on a terminal and print plain lines otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from vfiod.api import DEFAULT_SOCKET, ApiErrorCode, ClientError, ControlClient

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_DENIED, EXIT_NOT_FOUND, EXIT_BUSY = (
    0, 1, 2, 3, 4, 5, 6)
_CODE_EXIT = {ApiErrorCode.PERMISSION_DENIED: EXIT_DENIED, ApiErrorCode.NOT_FOUND: EXIT_NOT_FOUND,
              ApiErrorCode.BUSY: EXIT_BUSY}

EPILOG = f"""\
examples:
  vfiod ctl status                      guests, devices and migrations of this host
  vfiod ctl devices                     every VFIO device here, ours or not, and why
  vfiod ctl check g1                    can guest g1 migrate? if not, every reason
  vfiod ctl check 0000:3b:00.1          the same for one device (probes it if no guest owns it)
  vfiod ctl migrate g1 --to 10.0.0.2:4444
                                        live-migrate g1 to the vfiod on 10.0.0.2 (listening
                                        on 4444), showing progress until it ends
  vfiod ctl migrate g1 --to 10.0.0.2:4444 --downtime-limit 100 --timeout 120 --on-timeout force
                                        switch over once the predicted downtime is <= 100 ms;
                                        after 120 s of pre-copy, switch over anyway
  vfiod ctl cancel g1                   cancel g1's migration (the source keeps running)
  vfiod ctl dirty-tracking 0000:3b:00.1 off
                                        opt the device out of pre-copy dirty tracking (QEMU's
                                        x-pre-copy-dirty-page-tracking=off)
  vfiod ctl watch                       follow running migrations
  vfiod ctl status --json | jq .        everything as JSON, for scripts

guest states (vfiod ctl status):
  defined, claimed      configured; its devices and RAM opened, role not yet given
  running               runs here
  migrating-out         being migrated away, pre-copy (it still runs here)
  switching-over        paused here, its final state going to the destination
  migrated-away         the destination resumed it
  outcome-unknown       committed but the destination never answered: check it before
                        starting the guest anywhere else
  incoming              waiting for (or receiving) a migration into it
  loaded, prepared      received and loaded; prepared: verified, waiting for the commit
  failed                could not be opened, or broke; status says why

exit status:
  {EXIT_OK}  success (check: it can migrate; migrate/watch: the migration completed)
  {EXIT_FAILED}  the operation failed (check: it cannot migrate; migrate: failed or cancelled)
  {EXIT_USAGE}  bad usage
  {EXIT_UNREACHABLE}  no daemon at the socket (not running? wrong --socket?)
  {EXIT_DENIED}  permission denied: run as root or as a member of the vfiod group
  {EXIT_NOT_FOUND}  no such guest or device (or no migration to cancel)
  {EXIT_BUSY}  busy: the guest is migrating already
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ctl", help="control a running vfiod (status, check, migrate, cancel, watch)",
        description="Talk to the vfiod daemon over its control socket.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, None)
    sub = p.add_subparsers(dest="ctl_command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _common(common, argparse.SUPPRESS)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, parents=[common])

    s = add("status", "guests, their devices and migrations")
    s.add_argument("guest", nargs="?", help="only this guest")
    add("devices", "VFIO devices on this host, ours or not, and why")
    c = add("check", "can a guest or device migrate, and why not")
    c.add_argument("target", metavar="DEVICE|GUEST")
    m = add("migrate", "live-migrate a guest to another vfiod")
    m.add_argument("guest")
    m.add_argument("--to", required=True, metavar="HOST:PORT",
                   help="the destination vfiod's migration listener")
    m.add_argument("--downtime-limit", type=float, metavar="MS",
                   help="switch over when the predicted downtime is at most this "
                        "(default: the daemon's, 300 ms)")
    m.add_argument("--timeout", type=float, metavar="S",
                   help="seconds of pre-copy before --on-timeout applies")
    m.add_argument("--on-timeout", choices=("cancel", "force"),
                   help="at the timeout: cancel (the guest stays here) or force the "
                        "switchover (default: the daemon's, cancel)")
    m.add_argument("--detach", action="store_true",
                   help="return once started (follow later with vfiod ctl watch)")
    x = add("cancel", "cancel a guest's running migration")
    x.add_argument("guest")
    d = add("dirty-tracking", "turn a device's pre-copy dirty page tracking on or off")
    d.add_argument("device")
    d.add_argument("mode", choices=("on", "off"))
    w = add("watch", "follow running migrations (progress bar on a terminal, one line per "
                     "change otherwise, one JSON object per line with --json)")
    w.add_argument("guest", nargs="?", help="only this guest")
    w.add_argument("--interval", type=float, default=0.5, metavar="S",
                   help="seconds between updates (default 0.5)")
    p.set_defaults(handler=run, ctl_parser=p)


def _common(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument("--socket", metavar="PATH",
                   default=DEFAULT_SOCKET if default is None else default,
                   help=f"the daemon's control socket (default {DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true",
                   default=False if default is None else default,
                   help="print the daemon's answer as one JSON object")


def run(args: argparse.Namespace) -> int:
    if not args.ctl_command:
        args.ctl_parser.print_help()
        return EXIT_USAGE
    if args.ctl_command == "migrate" and args.on_timeout and args.timeout is None:
        print("vfiod ctl migrate: --on-timeout needs --timeout", file=sys.stderr)
        return EXIT_USAGE
    try:
        with ControlClient(args.socket) as client:
            return _COMMANDS[args.ctl_command](client, args, sys.stdout)
    except ClientError as e:
        print(f"vfiod ctl {args.ctl_command}: {e.message}", file=sys.stderr)
        if e.kind == "connect":
            return EXIT_UNREACHABLE
        return _CODE_EXIT.get(e.code, EXIT_FAILED) if e.code else EXIT_FAILED


# -- formatting helpers -------------------------------------------------------------------
def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.0f} ms"


def _json(out: TextIO, obj: Any) -> None:
    out.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _outcome(m: dict[str, Any]) -> str:
    where = f"{'to' if m['role'] == 'source' else 'from'} {m['peer']}"
    if m["result"] is None:
        pr = m["progress"]
        return (f"{m['role']} {where}: {pr['phase']} iteration {pr['iteration']}, predicted "
                f"downtime {_ms(pr['predicted_downtime_s'])}")
    text = f"{m['result']} {where}"
    if m["result"] == "completed":
        text += (f" (downtime {_ms(m['downtime_s'])}, predicted "
                 f"{_ms(m['predicted_downtime_s'])}, verified "
                 f"{'yes' if m['verified'] else 'no'})")
    elif m["error"]:
        text += f": {m['error']}"
    return text


# -- commands -----------------------------------------------------------------------------
def _status(c: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    r = c.call("status", {"guest": args.guest} if args.guest else {})
    if args.json:
        _json(out, r)
        return EXIT_OK
    d = r["daemon"]
    out.write(f"vfiod {d['version']} ({d['backend']} backend), pid {d['pid']}, up "
              f"{d['uptime_s']:.0f} s; control {d['control_socket']}; metrics "
              f"{d['metrics'] or 'off'}; incoming {d['migration_listen'] or 'off'}\n")
    if d["reload_error"]:
        out.write(f"last reload refused: {d['reload_error']}\n")
    if d["restart_needed"]:
        out.write(f"restart needed for: {', '.join(d['restart_needed'])}\n")
    if not r["guests"]:
        out.write("no guests configured\n")
    for g in r["guests"]:
        out.write(f"\nguest {g['name']}: {g['state']}, {_size(g['ram_bytes'])} RAM\n")
        if g["error"]:
            out.write(f"  error: {g['error']}\n")
        for dev in g["devices"]:
            track = "on" if dev["pre_copy_dirty_page_tracking"] else "OFF (opt-out)"
            out.write(f"  {dev['name']:<38} {dev['protocol'] or '-':<3} "
                      f"{dev['state_label']:<20} tracker {dev['tracker'] or '-':<15} "
                      f"pre-copy tracking {track}\n")
        m = g["migration"]
        if m is not None:
            out.write(f"  migration {m['id']}: {_outcome(m)}\n")
            live = m.get("live") or {}
            if live.get("triple"):
                out.write(f"  state {live['triple']}\n")
    return EXIT_OK


def _devices(c: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    r = c.call("devices")
    if args.json:
        _json(out, r)
        return EXIT_OK
    out.write(f"{'DEVICE':<38} {'KIND':<4} {'GROUP':>5} {'DRIVER':<18} {'GUEST':<10} STATUS\n")
    for d in r["devices"]:
        status = (f"{d['protocol'] or '-'} {d['state']}, tracker {d['tracker'] or '-'}"
                  if d["guest"] else ("usable, " if d["vfio_capable"] else "") + d["reason"])
        out.write(f"{d['name']:<38} {d['kind']:<4} {d['group'] if d['group'] is not None else '-':>5} "
                  f"{d['driver'] or '-':<18} {d['guest'] or '-':<10} {status}\n")
    return EXIT_OK


def _check(c: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    r = c.call("check", {"target": args.target})
    code = EXIT_OK if r["migratable"] else EXIT_FAILED
    if args.json:
        _json(out, r)
        return code
    what = f"{r['kind']} {r['target']}"
    out.write(f"{what}: {'can migrate' if r['migratable'] else 'cannot migrate'}\n")
    for b in r["blockers"]:
        out.write(f"  - {b}\n")
    for n in r["notes"]:
        out.write(f"  note: {n}\n")
    for d in r.get("devices", []):
        caps = ", ".join(d["capabilities"]) or "-"
        out.write(f"  {d['name']}: {d['protocol'] or 'not migratable'} ({caps}), tracker "
                  f"{d['tracker'] or '-'}, device logging {'yes' if d['dma_logging'] else 'no'}"
                  "\n")
    if r["kind"] == "device" and r.get("protocol"):
        out.write(f"  protocol {r['protocol']} ({', '.join(r.get('capabilities') or [])}), "
                  f"tracker {r.get('tracker') or '-'}\n")
    return code


def _migrate(c: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    req: dict[str, Any] = {"guest": args.guest, "to": args.to}
    for key, val in (("downtime_limit_ms", args.downtime_limit), ("timeout_s", args.timeout),
                     ("on_timeout", args.on_timeout)):
        if val is not None:
            req[key] = val
    r = c.call("migrate", req)
    m = r["migration"]
    if args.detach:
        if args.json:
            _json(out, r)
        else:
            out.write(f"migration {m['id']} of {args.guest} to {args.to} started; follow it "
                      f"with: vfiod ctl watch {args.guest}\n")
        return EXIT_OK
    if not args.json:
        out.write(f"migrating {args.guest} to {args.to} (migration {m['id']})\n")
    return _follow(c, args.guest, args.json, out, 0.5, m["id"])


def _cancel(c: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    r = c.call("cancel", {"guest": args.guest})
    if args.json:
        _json(out, r)
    else:
        out.write(f"cancel requested for {r['guest']} (migration {r['migration']}); the "
                  "source rolls back to RUNNING\n")
    return EXIT_OK


def _dirty(c: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    r = c.call("dirty_tracking", {"device": args.device, "enabled": args.mode == "on"})
    if args.json:
        _json(out, r)
    else:
        out.write(f"{r['device']} (guest {r['guest']}): pre-copy dirty page tracking "
                  f"{'on' if r['pre_copy_dirty_page_tracking'] else 'off'}\n")
    return EXIT_OK


def _watch(c: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    if args.interval <= 0:
        print("vfiod ctl watch: --interval must be positive", file=sys.stderr)
        return EXIT_USAGE
    return _follow(c, args.guest, args.json, out, args.interval, None)


# -- following a migration ----------------------------------------------------------------
def _active(r: dict[str, Any], guest: str | None) -> list[dict[str, Any]]:
    return [g for g in r["guests"] if (guest is None or g["name"] == guest)
            and g["migration"] and g["migration"]["result"] is None]


def _bar_line(g: dict[str, Any]) -> str:
    m = g["migration"]
    pr = m["progress"]
    total = pr["ram_total_bytes"] or 1
    left = pr["ram_remaining_bytes"] + pr["device_remaining_bytes"]
    done = 0.0 if pr["iteration"] == 0 else max(0.0, min(1.0, 1 - left / total))
    bar = "#" * int(done * 20) + "-" * (20 - int(done * 20))
    limit = f" (limit {m['downtime_limit_ms']:.0f} ms)" if m["downtime_limit_ms"] else ""
    conv = "" if pr["will_converge"] is not False else "  WILL NOT CONVERGE"
    triple = (m.get("live") or {}).get("triple", "")
    return (f"{g['name']} [{bar}] {done * 100:3.0f}%  {pr['phase']:<8} iter "
            f"{pr['iteration']:>3}  remaining {_size(left):>10}  predicted downtime "
            f"{_ms(pr['predicted_downtime_s'])}{limit}{conv}  {triple}")


def _follow(c: ControlClient, guest: str | None, as_json: bool, out: TextIO,
            interval: float, migration_id: str | None) -> int:
    tty = out.isatty() and not as_json
    seen: dict[str, str] = {}
    last_lines: dict[str, str] = {}
    results: list[str] = []
    while True:
        r = c.call("status", {"guest": guest} if guest else {})
        active = _active(r, guest)
        for g in active:
            seen[g["name"]] = g["migration"]["id"]
            line = _bar_line(g)
            if as_json:
                out.write(json.dumps({"guest": g["name"], "migration": g["migration"]}) + "\n")
            elif tty:
                out.write("\r\x1b[K" + line)
            elif line != last_lines.get(g["name"]):
                out.write(line + "\n")
            last_lines[g["name"]] = line
            out.flush()
        for g in r["guests"]:
            mid = seen.get(g["name"]) or (migration_id if g["name"] == guest else None)
            m = g["migration"]
            if mid and m and m["id"] == mid and m["result"] is not None:
                seen.pop(g["name"], None)
                results.append(m["result"])
                if as_json:
                    out.write(json.dumps({"guest": g["name"], "migration": m}) + "\n")
                else:
                    out.write(("\r\x1b[K" if tty else "") + f"{g['name']}: {_outcome(m)}\n")
                migration_id = None if g["name"] == guest else migration_id
        if not seen and not migration_id:
            if not results and not as_json:
                out.write("no migration running\n")
            return EXIT_OK if all(x == "completed" for x in results) else EXIT_FAILED
        time.sleep(interval)     # the display's refresh period, not a wait for a condition


_COMMANDS = {"status": _status, "devices": _devices, "check": _check, "migrate": _migrate,
             "cancel": _cancel, "dirty-tracking": _dirty, "watch": _watch}
