"""``vfiod`` command line: the argparse front of the daemon, the control client and the demo.

Subcommands are registered by small modules in this package; each adds its parser and a
handler returning the process exit code, one of ``vfiod.cli.exits.EXIT_TABLE``. A usage
error argparse finds is reported like every other error (one JSON object on stdout with
``--json``); Ctrl-C and a reader that closes our stdout end the command without a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from vfiod import __version__
from vfiod.cli.exits import Exit, report_error, table_text

EPILOG = f"""\
examples:
  vfiod demo                      migrate a simulated 4 GiB guest with three devices
  vfiod demo --json               the same, one JSON summary for scripts
  vfiod devices                   list VFIO devices on this host and whether vfiod can own them
  vfiod devices --sim             the same on a simulated host (no VFIO needed)
  vfiod kernels                   compile or load numba's kernels (the unit runs it first)
  vfiod run --config /etc/vfiod/vfiod.toml
                                  the daemon (what the systemd unit runs)
  vfiod ctl status                ask the running daemon (vfiod ctl --help for more)
  vfiod ctl migrate g1 --to 10.0.0.2:4444
                                  live-migrate guest g1 to the vfiod on 10.0.0.2

exit status (every command; errors go to stderr, or with --json one JSON object
{{"code", "message", "details"}} to stdout):
{table_text()}"""


class ArgvError(Exception):
    """argparse found the command line wrong; ``parser`` is the (sub)command's parser."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        self.parser = parser
        self.message = message
        super().__init__(message)


class _Parser(argparse.ArgumentParser):
    # Subparsers inherit the class, so every subcommand reports through main().
    def error(self, message: str) -> NoReturn:
        raise ArgvError(self, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vfiod",
        description="VFIO migration daemon: device state and DMA-dirtied memory, live, "
                    "with predicted and measured downtime.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vfiod {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from vfiod.cli import ctl_cmd, demo_cmd, devices_cmd, kernels_cmd, run_cmd

    demo_cmd.register(sub)
    devices_cmd.register(sub)
    kernels_cmd.register(sub)
    run_cmd.register(sub)
    ctl_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ArgvError as e:
        if "--json" not in argv:
            e.parser.print_usage(sys.stderr)
        return report_error(e.parser.prog, Exit.USAGE, e.message if "--json" in argv
                            else f"error: {e.message}", as_json="--json" in argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return Exit.USAGE
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return Exit.INTERRUPTED
    except BrokenPipeError:
        # The reader left (vfiod ctl status | head): stop quietly, and point stdout at
        # /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return Exit.PIPE_CLOSED


if __name__ == "__main__":
    sys.exit(main())
