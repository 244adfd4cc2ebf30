"""``vfiod ctl``: the operator's client of the control socket (docs/architecture.md §6). It imports
only ``vfiod.api`` (the protocol), never the daemon.

Every subcommand prints for people by default and one JSON object with ``--json`` (the
daemon's answer as it is, for scripts). ``watch`` and ``migrate`` draw a live progress bar
with the predicted downtime on a terminal and print plain lines otherwise (one JSON
object per line with ``--json``). What the client can tell is wrong (the daemon's own
argument checks, an unresolvable destination) is refused before the daemon is asked;
errors and exit codes follow the one table of ``vfiod.cli.exits``; the parser and the
help are ``vfiod.cli.ctl_parser``.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any, TextIO

from vfiod.api import ApiError, ClientError, ControlClient, MigrateArgs, parse_args
from vfiod.cli import ctl_parser
from vfiod.cli.ctl_outcome import outcome_line
from vfiod.cli.exits import API_EXIT, Exit, report_error
from vfiod.cli.observed_render import write_observed

EPILOG = ctl_parser.EPILOG


def register(subparsers: Any) -> None:
    ctl_parser.register(subparsers, run)


def run(args: argparse.Namespace) -> int:
    if not args.ctl_command:
        args.ctl_parser.print_help()
        return Exit.USAGE
    command = f"vfiod ctl {args.ctl_command}"
    try:
        _check_usage(args)
    except _UsageError as e:
        return report_error(command, e.status, e.message, as_json=args.json)
    try:
        with ControlClient(args.socket) as client:
            return _COMMANDS[args.ctl_command](client, args, sys.stdout)
    except ClientError as e:
        if e.kind == "api" and e.code is not None:
            return report_error(command, API_EXIT[e.code], e.message, as_json=args.json,
                                code=e.code.value)
        status = {"connect": Exit.UNREACHABLE, "denied": Exit.PERMISSION_DENIED
                  }.get(e.kind, Exit.FAILED)
        return report_error(command, status, e.message, as_json=args.json)


class _UsageError(Exception):
    def __init__(self, message: str, status: Exit = Exit.USAGE) -> None:
        self.message = message
        self.status = status
        super().__init__(message)


def _check_usage(args: argparse.Namespace) -> None:
    """What the client can tell is wrong before asking the daemon: the same checks the
    daemon makes (``vfiod.api.parse_args``), and that the destination host resolves."""
    if args.ctl_command == "watch" and args.interval <= 0:
        raise _UsageError("--interval must be positive")
    if args.ctl_command != "migrate":
        return
    if args.on_timeout and args.timeout is None:
        raise _UsageError("--on-timeout needs --timeout")
    try:
        req = parse_args("migrate", _migrate_request(args))
    except ApiError as e:
        raise _UsageError(e.message.removeprefix("migrate: ")) from None
    assert isinstance(req, MigrateArgs)
    try:
        socket.getaddrinfo(req.host, req.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        # A name that does not exist is the operator's typo; anything else (no DNS
        # server answering) is a failure of this host.
        status = Exit.USAGE if e.errno in (socket.EAI_NONAME, socket.EAI_NODATA) else Exit.FAILED
        raise _UsageError(f"cannot resolve the destination host {req.host!r}: "
                          f"{e.strerror}", status) from None


def _migrate_request(args: argparse.Namespace) -> dict[str, Any]:
    req: dict[str, Any] = {"guest": args.guest, "to": args.to}
    for key, val in (("downtime_limit_ms", args.downtime_limit), ("timeout_s", args.timeout),
                     ("on_timeout", args.on_timeout), ("channels", args.channels)):
        if val is not None:
            req[key] = val
    return req


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


# -- commands -----------------------------------------------------------------------------
def _status(c: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    r = c.call("status", {"guest": args.guest} if args.guest else {})
    if args.json:
        _json(out, r)
        return Exit.OK
    d = r["daemon"]
    out.write(f"vfiod {d['version']} ({d['backend']} backend), pid {d['pid']}, up "
              f"{d['uptime_s']:.0f} s; control {d['control_socket']}; metrics "
              f"{d['metrics'] or 'off'}; incoming {d['migration_listen'] or 'off'}\n")
    if d["reload_error"]:
        out.write(f"last reload refused: {d['reload_error']}\n")
    if d["restart_needed"]:
        out.write(f"restart needed for: {', '.join(d['restart_needed'])}\n")
    if d.get("history_warning"):     # an older daemon has no such field
        out.write(f"switchover history not restored (predictions start without it): "
                  f"{d['history_warning']}\n")
    if not r["guests"]:
        out.write("no guests configured\n")
    for g in r["guests"]:
        out.write(f"\nguest {g['name']}: {g['state']}, {_size(g['ram_bytes'])} RAM\n")
        if g["error"]:
            out.write(f"  error: {g['error']}\n")
        for note in g.get("notes") or ():
            out.write(f"  recovered: {note}\n")
        u = g.get("unsettled")
        if u:
            asked = (f"last answer {u['peer_last_answer']!r}" if u["peer_last_answer"]
                     else f"no answer yet{': ' + u['peer_last_error'] if u['peer_last_error'] else ''}")
            out.write(f"  OUTCOME UNKNOWN: migration {u['migration_id']} ({u['role']}) is "
                      f"unsettled; the guest runs nowhere that this host can see. Asking "
                      f"{u['peer'] or 'nobody (no peer address)'}: {asked}. If the peer is "
                      f"gone for good: vfiod ctl resolve {g['name']} --resume-here|--discard\n")
        for dev in g["devices"]:
            track = "on" if dev["pre_copy_dirty_page_tracking"] else "OFF (opt-out)"
            out.write(f"  {dev['name']:<38} {dev['protocol'] or '-':<3} "
                      f"{dev['state_label']:<20} tracker {dev['tracker'] or '-':<15} "
                      f"pre-copy tracking {track}\n")
        m = g["migration"]
        if m is not None:
            out.write(f"  migration {m['id']}: {outcome_line(m)}\n")
            for warning in m.get("warnings") or ():
                out.write(f"  warning: {warning}\n")
            live = m.get("live") or {}
            if live.get("triple"):
                out.write(f"  state {live['triple']}\n")
    write_observed(r.get("observed") or [], out)
    return Exit.OK


def _devices(c: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    r = c.call("devices")
    if args.json:
        _json(out, r)
        return Exit.OK
    out.write(f"{'DEVICE':<38} {'KIND':<4} {'GROUP':>5} {'DRIVER':<18} {'GUEST':<10} STATUS\n")
    for d in r["devices"]:
        status = (f"{d['protocol'] or '-'} {d['state']}, tracker {d['tracker'] or '-'}"
                  if d["guest"] else ("usable, " if d["vfio_capable"] else "") + d["reason"])
        if d["vfio_capable"] and not d["migratable"]:
            status += f"; cannot migrate: {d['migratable_reason']}"
        out.write(f"{d['name']:<38} {d['kind']:<4} {d['group'] if d['group'] is not None else '-':>5} "
                  f"{d['driver'] or '-':<18} {d['guest'] or '-':<10} {status}\n")
    return Exit.OK


def _check(c: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    r = c.call("check", {"target": args.target})
    code = Exit.OK if r["migratable"] else Exit.FAILED
    if args.json:
        _json(out, r)
        return code
    what = f"{r['kind']} {r['target']}"
    o = r.get("outlook")
    if r["blockers"] or o is None:
        out.write(f"{what}: {'can migrate' if r['migratable'] else 'cannot migrate'}\n")
    else:
        out.write(f"{what}: {o['verdict']} (predicted downtime {o['predicted_downtime_ms']:.0f} "
                  f"ms, limit {o['downtime_limit_ms']:.0f} ms)\n")
    for b in r["blockers"]:
        out.write(f"  - {b}\n")
    for why in o["reasons"] if o is not None else ():
        out.write(f"  - {why}\n")
    for n in r["notes"]:
        out.write(f"  note: {n}\n")
    for d in r.get("devices", []):
        caps = ", ".join(d["capabilities"]) or "-"
        named = f"{d['name']} (id {d['id']})" if d.get("id") else d["name"]
        out.write(f"  {named}: {d['protocol'] or 'not migratable'} ({caps}), tracker "
                  f"{d['tracker'] or '-'}, device logging {'yes' if d['dma_logging'] else 'no'}"
                  "\n")
    if r["kind"] == "device" and r.get("protocol"):
        out.write(f"  protocol {r['protocol']} ({', '.join(r.get('capabilities') or [])}), "
                  f"tracker {r.get('tracker') or '-'}\n")
    return code


def _migrate(c: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    r = c.call("migrate", _migrate_request(args))
    m = r["migration"]
    if args.detach:
        if args.json:
            _json(out, r)
        else:
            out.write(f"migration {m['id']} of {args.guest} to {args.to} started; "
                      f"{_HOW_TO.format(guest=args.guest)}\n")
        return Exit.OK
    if not args.json:
        out.write(f"migrating {args.guest} to {args.to} (migration {m['id']})\n")
    try:
        return _follow(c, args.guest, args.json, out, 0.5, m["id"])
    except KeyboardInterrupt:
        _interrupted(c, args.guest, m["id"])
        raise


_HOW_TO = "follow it with: vfiod ctl watch {guest}; cancel it with: vfiod ctl cancel {guest}"


def _interrupted(c: ControlClient, guest: str, mid: str) -> None:
    """Ctrl-C while ``migrate`` follows: the migration runs in the daemon, not here, so
    say what happens to it. On a terminal ask; otherwise (a script was stopped) cancel."""
    if sys.stdin.isatty():
        print(f"\ncancel migration {mid} of {guest}? [y/N] ", end="", file=sys.stderr,
              flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            print(f"the migration keeps running: vfiod ctl watch {guest} to follow it, "
                  f"vfiod ctl cancel {guest} to cancel it", file=sys.stderr)
            return
    try:
        with c.reopen() as fresh:         # the interrupted call may have left c mid-answer
            fresh.call("cancel", {"guest": guest})
    except ClientError as e:
        print(f"interrupted: could not cancel migration {mid} of {guest}: {e.message}",
              file=sys.stderr)
        return
    print(f"interrupted: cancelled migration {mid} of {guest}; the guest keeps running here",
          file=sys.stderr)


def _cancel(c: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    r = c.call("cancel", {"guest": args.guest})
    if args.json:
        _json(out, r)
    else:
        out.write(f"cancel requested for {r['guest']} (migration {r['migration']}); the "
                  "source rolls back to RUNNING\n")
    return Exit.OK


def _resolve(c: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    r = c.call("resolve", {"guest": args.guest, "resume_here": bool(args.resume_here)})
    if args.json:
        _json(out, r)
    else:
        out.write(f"{r['guest']}: {r['result']}; it is {r['state']} here now\n")
    return Exit.OK


def _dirty(c: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    r = c.call("dirty_tracking", {"device": args.device, "enabled": args.mode == "on"})
    if args.json:
        _json(out, r)
    else:
        out.write(f"{r['device']} (guest {r['guest']}): pre-copy dirty page tracking "
                  f"{'on' if r['pre_copy_dirty_page_tracking'] else 'off'}\n")
    return Exit.OK


def _watch(c: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    return _follow(c, args.guest, args.json, out, args.interval, None, wait=not args.once)


# -- following a migration ----------------------------------------------------------------
def _active(r: dict[str, Any], guest: str | None) -> list[dict[str, Any]]:
    return [g for g in r["guests"] if (guest is None or g["name"] == guest)
            and g["migration"] and g["migration"]["result"] is None]


def _progress_line(g: dict[str, Any], bar: bool) -> str:
    """One migration's progress: with a bar (a terminal redraws it) or as plain words."""
    m = g["migration"]
    pr = m["progress"]
    total = pr["ram_total_bytes"] or 1
    left = pr["ram_remaining_bytes"] + pr["device_remaining_bytes"]
    done = 0.0 if pr["iteration"] == 0 else max(0.0, min(1.0, 1 - left / total))
    limit = f" (limit {m['downtime_limit_ms']:.0f} ms)" if m["downtime_limit_ms"] else ""
    conv = "" if pr["will_converge"] is not False else "  WILL NOT CONVERGE"
    triple = (m.get("live") or {}).get("triple", "")
    rate = _speed(pr.get("throughput_bps"), pr.get("eta_s"))
    if not bar:
        return (f"{g['name']} {done * 100:.0f}% {pr['phase']} iter {pr['iteration']} "
                f"sent {_size(pr.get('bytes_sent'))} remaining {_size(left)}{rate} "
                f"predicted downtime {_ms(pr['predicted_downtime_s'])}{limit}{conv} "
                f"{triple}").rstrip()
    drawn = "#" * int(done * 20) + "-" * (20 - int(done * 20))
    return (f"{g['name']} [{drawn}] {done * 100:3.0f}%  {pr['phase']:<8} iter "
            f"{pr['iteration']:>3}  sent {_size(pr.get('bytes_sent')):>10}  remaining "
            f"{_size(left):>10}{rate}  predicted downtime "
            f"{_ms(pr['predicted_downtime_s'])}{limit}{conv}  {triple}")


def _speed(bps: float | None, eta_s: float | None) -> str:
    """Throughput and ETA, once the link's rate was measured (nothing before)."""
    if not bps:
        return ""
    eta = "" if eta_s is None else f" eta {eta_s:.1f} s"
    return f" at {bps / 1e6:.1f} MB/s{eta}"


def _follow(c: ControlClient, guest: str | None, as_json: bool, out: TextIO,
            interval: float, migration_id: str | None, *, wait: bool = False) -> int:
    """Print the progress of running migrations until they end; the exit status is
    OK only if every one completed. ``wait``: if none runs yet, wait for one."""
    tty = out.isatty() and not as_json
    seen: dict[str, str] = {}
    last_lines: dict[str, str] = {}
    results: list[str] = []
    announced = False
    while True:
        r = c.call("status", {"guest": guest} if guest else {})
        active = _active(r, guest)
        if wait and not active and not seen and not migration_id:
            if not as_json and not announced:
                out.write("waiting for a migration to start (Ctrl-C to stop)\n")
                out.flush()
            announced = True
            time.sleep(interval)  # the display's refresh period, not a wait for a condition
            continue
        for g in active:
            seen[g["name"]] = g["migration"]["id"]
            line = _progress_line(g, bar=tty)
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
                    out.write(("\r\x1b[K" if tty else "") + f"{g['name']}: {outcome_line(m)}\n")
                migration_id = None if g["name"] == guest else migration_id
        if not seen and not migration_id:
            if not results and not as_json:
                out.write("no migration running\n")
            return Exit.OK if all(x == "completed" for x in results) else Exit.FAILED
        time.sleep(interval)     # the display's refresh period, not a wait for a condition


_COMMANDS = {"status": _status, "devices": _devices, "check": _check, "migrate": _migrate,
             "cancel": _cancel, "resolve": _resolve, "dirty-tracking": _dirty,
             "watch": _watch}
