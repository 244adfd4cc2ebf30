"""``vfiod`` command line: the argparse front of the daemon, the control client and the demo.

Subcommands are registered by small modules in this package; each adds its parser and a
handler returning the process exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vfiod import __version__

EPILOG = """\
examples:
  vfiod demo                      migrate a simulated 4 GiB guest with three devices
  vfiod demo --json               the same, one JSON summary for scripts
  vfiod devices                   list VFIO devices on this host and whether vfiod can own them
  vfiod devices --sim             the same on a simulated host (no VFIO needed)
  vfiod run --config /etc/vfiod/vfiod.toml
                                  the daemon (what the systemd unit runs)
  vfiod ctl status                ask the running daemon (vfiod ctl --help for more)
  vfiod ctl migrate g1 --to 10.0.0.2:4444
                                  live-migrate guest g1 to the vfiod on 10.0.0.2

Exit codes: 0 success, 1 operation failed (the message says why), 2 bad usage.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfiod",
        description="VFIO migration daemon: device state and DMA-dirtied memory, live, "
                    "with predicted and measured downtime.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vfiod {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from vfiod.cli import ctl_cmd, demo_cmd, devices_cmd, run_cmd

    demo_cmd.register(sub)
    devices_cmd.register(sub)
    run_cmd.register(sub)
    ctl_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
