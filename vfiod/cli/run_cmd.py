"""``vfiod run``: the daemon in the foreground, as systemd starts it (docs/architecture.md §6).

Logs go to stderr (the journal under systemd, which adds its own timestamps, so they are
left out when ``$JOURNAL_STREAM`` says stderr is the journal).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

DESCRIPTION = "Run the vfiod daemon in the foreground (systemd: Type=notify)."

EPILOG = """\
examples:
  vfiod run --config /etc/vfiod/vfiod.toml
        what the systemd unit runs: real VFIO devices, the control socket at
        /run/vfiod/control.sock, metrics on 127.0.0.1:9477
  vfiod run --backend sim --config sim.toml --control-socket /tmp/vfiod.sock \\
            --metrics-listen 127.0.0.1:0 --migration-listen 127.0.0.1:4444
        a daemon on a simulated host ([sim] section of the config): no VFIO needed

signals: SIGTERM/SIGINT stop (running migrations are cancelled, source devices return
to RUNNING); SIGHUP reloads the configuration (systemctl reload vfiod).

exit status: 0 stopped cleanly; 1 could not start (bad configuration: the message names
the file, line and key; socket in use; ...); 2 bad usage.
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="run the daemon (foreground)", description=DESCRIPTION,
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("linux", "sim"), default="linux",
                   help="linux: real VFIO under /sys and /dev (default); sim: the simulated "
                        "kernel and the host described by the config's [sim] section")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="TOML configuration (default /etc/vfiod/vfiod.toml if it exists)")
    p.add_argument("--control-socket", metavar="PATH", default=None,
                   help="control socket path (default: [control] socket, "
                        "/run/vfiod/control.sock)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT", default=None,
                   help="Prometheus endpoint (default: [metrics] listen, 127.0.0.1:9477; "
                        "port 0 picks a free one; \"\" turns it off)")
    p.add_argument("--migration-listen", metavar="HOST:PORT", default=None,
                   help="accept incoming migrations here (default: [migration] listen)")
    p.add_argument("--sim-root", metavar="DIR", default=None,
                   help="directory for the simulated host's /sys and /dev trees "
                        "(default: a temporary directory, removed on exit)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   default="info")
    p.set_defaults(handler=run)


def setup_logging(level: str) -> None:
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if journal else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt, force=True)


def run(args: argparse.Namespace) -> int:
    # Imported here: the daemon pulls in numba and the whole stack, which other
    # subcommands (vfiod ctl) should not pay for at start-up.
    from vfiod.daemon.main import RunOptions, run_daemon

    setup_logging(args.log_level)
    return run_daemon(RunOptions(backend=args.backend, config=args.config,
                                 control_socket=args.control_socket,
                                 metrics_listen=args.metrics_listen,
                                 migration_listen=args.migration_listen,
                                 sim_root=args.sim_root))
