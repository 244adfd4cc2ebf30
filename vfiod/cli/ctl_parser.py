"""The ``vfiod ctl`` command line: its parser, its help (the guest states, the exit-code
table of ``vfiod.cli.exits``) and an example for every subcommand (docs/protocol.md: the
operations behind them).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from vfiod.api import DEFAULT_SOCKET
from vfiod.cli.exits import table_text

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
  vfiod ctl watch                       follow migrations until they end (waits for one)
  vfiod ctl status --json | jq .        everything as JSON, for scripts

Ctrl-C during migrate: the migration runs in the daemon, so on a terminal vfiod ctl
asks whether to cancel it; without one (a script was stopped) it cancels it and says
so. --detach returns at once and prints how to follow and cancel the migration.

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

errors: one line on stderr; with --json one JSON object on stdout instead,
  {{"code": ..., "message": ..., "details": {{"command": ..., "exit_status": ...}}}}

exit status:
{table_text()}"""


#: An example or two for each subcommand's own --help.
EXAMPLES = {
    "status": """\
  vfiod ctl status                  every guest: state, devices, migration
  vfiod ctl status g1 --json | jq .guests[0].state
                                    one guest's lifecycle state, for a script""",
    "devices": """\
  vfiod ctl devices                 every VFIO device: ours or not, whose, and why
  vfiod ctl devices --json          the same as JSON""",
    "check": """\
  vfiod ctl check g1                can guest g1 migrate? exit 0 if so, 1 with the reasons
  vfiod ctl check 0000:3b:00.1      one device (probed on the spot if no guest owns it)""",
    "migrate": """\
  vfiod ctl migrate g1 --to 10.0.0.2:4444
                                    migrate g1 to the vfiod listening on 10.0.0.2:4444
  vfiod ctl migrate g1 --to [fd00::2]:4444 --downtime-limit 100 --timeout 120 \\
        --on-timeout force          switch over at <= 100 ms predicted, or after 120 s
  vfiod ctl migrate g1 --to 10.0.0.2:4444 --detach
                                    start it and return, printing how to follow and
                                    cancel it""",
    "cancel": """\
  vfiod ctl cancel g1               stop g1's migration; g1 keeps running here""",
    "resolve": """\
  vfiod ctl status g1               "unsettled": who was asked, their last answer
  vfiod ctl resolve g1 --resume-here   the peer is gone for good and never ran g1: run it here
  vfiod ctl resolve g1 --discard       g1 runs on the peer: give it up here""",
    "dirty-tracking": """\
  vfiod ctl dirty-tracking 0000:3b:00.1 off
                                    opt the device out of pre-copy dirty tracking
  vfiod ctl dirty-tracking 0000:3b:00.1 on
                                    and back in""",
    "watch": """\
  vfiod ctl watch                   follow every running migration until it ends (wait
                                    for one to start if none runs)
  vfiod ctl watch --once            the same, but exit at once if none runs
  vfiod ctl watch g1 --json         one JSON object per update, for a script""",
}


def register(subparsers: Any, handler: Callable[[argparse.Namespace], int]) -> None:
    p = subparsers.add_parser(
        "ctl", help="control a running vfiod (status, check, migrate, cancel, watch)",
        description="Talk to the vfiod daemon over its control socket.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, None)
    sub = p.add_subparsers(dest="ctl_command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _common(common, argparse.SUPPRESS)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, parents=[common],
                              epilog=f"example:\n{EXAMPLES[name]}\n\nexit status: see vfiod "
                                     "ctl --help",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

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
    m.add_argument("--channels", type=int, metavar="N",
                   help="send RAM over N extra connections, 1-16, if the destination "
                        "offers them (default: the daemon's [migration] channels, 1)")
    m.add_argument("--detach", action="store_true",
                   help="return once started, printing how to follow and cancel it")
    x = add("cancel", "cancel a guest's running migration")
    x.add_argument("guest")
    r = add("resolve", "settle a migration whose outcome is unknown, when its peer is gone "
                       "for good (the peer is asked once more first; its answer wins)")
    r.add_argument("guest")
    how = r.add_mutually_exclusive_group(required=True)
    how.add_argument("--resume-here", action="store_true",
                     help="run the guest on this host (refused if the peer confirmed it "
                          "resumed there)")
    how.add_argument("--discard", action="store_true",
                     help="give it up here: the guest runs on the peer")
    d = add("dirty-tracking", "turn a device's pre-copy dirty page tracking on or off")
    d.add_argument("device")
    d.add_argument("mode", choices=("on", "off"))
    w = add("watch", "follow migrations until they end, waiting for one if none runs "
                     "(progress bar on a terminal, one line per change otherwise, one JSON "
                     "object per line with --json)")
    w.add_argument("guest", nargs="?", help="only this guest")
    w.add_argument("--interval", type=float, default=0.5, metavar="S",
                   help="seconds between updates (default 0.5)")
    w.add_argument("--once", action="store_true",
                   help="if no migration runs now, say so and exit (default: wait for one)")
    p.set_defaults(handler=handler, ctl_parser=p)


def _common(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument("--socket", metavar="PATH",
                   default=DEFAULT_SOCKET if default is None else default,
                   help=f"the daemon's control socket (default {DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true",
                   default=False if default is None else default,
                   help="print the daemon's answer as one JSON object")
