"""``vfiod kernels``: compile, or load from numba's cache, every kernel a migration runs
(docs/architecture.md §6, systemd).

A daemon loads its numba kernels from the cache when its first migration starts
(0.2-0.4 s); with a cache that an install or an upgrade left empty it compiles them
there instead, 9.5-11 s of compiling on the project's 2-core machine (split between the
two daemons), inside the migration: `vfiod demo` with an empty cache took 15-16 s instead
of 3, its setup waiting on the compiler, and its prediction was 0.70-0.92 off (README
"numba's cache"). This command runs the warm-up both ends of a migration run
(``warm_source``: the dirty bitmap kernels, the count of pages never sent, and the
rehearsal of the stream, the landing and the digests) in its own process, so the cache
is warm before any migration, and the daemon never holds numba for it. The systemd unit runs it before the
daemon (``ExecStartPre``); `vfiod demo` runs it first. It writes wherever numba caches:
``NUMBA_CACHE_DIR`` when set (the unit sets /var/cache/vfiod/numba), else numba's
default, next to the installed package or in the user's cache.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vfiod.cli.exits import Exit, report_error

DESCRIPTION = """\
Compile, or load from numba's cache, every kernel a migration runs, so that a daemon's
first migration after an install or an upgrade does not compile them itself (the
demo's migration then took 15 s instead of 3). The systemd unit runs this before the
daemon.
The cache is NUMBA_CACHE_DIR when set (the unit sets /var/cache/vfiod/numba), else
numba's default next to the installed package."""

EPILOG = """\
examples:
  vfiod kernels                   1.2-1.5 s with the cache warm; about 10 s once after
                                  an install or an upgrade (2 cores)
  NUMBA_CACHE_DIR=/var/cache/vfiod/numba vfiod kernels --json
                                  the cache the systemd unit's daemon reads

exit status: see vfiod --help
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("kernels", help="compile or load every numba kernel a "
                              "migration runs (before the daemon starts)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def cache_dir() -> str:
    return os.environ.get("NUMBA_CACHE_DIR") or "numba's default (next to the package)"


@contextmanager
def compiled_kernels() -> Iterator[list[str]]:
    """The vfiod kernels numba compiles while the block runs (a kernel loaded from the
    cache is not compiled), as ``module.name``, in order."""
    from numba.core import event

    compiled: list[str] = []

    class Compiles(event.Listener):
        def on_start(self, ev: event.Event) -> None:
            pass

        def on_end(self, ev: event.Event) -> None:
            fn = getattr(ev.data.get("dispatcher"), "py_func", None)
            if fn is not None and fn.__module__.startswith("vfiod."):
                compiled.append(f"{fn.__module__}.{fn.__qualname__}")

    with event.install_listener("numba:compile", Compiles()):
        yield compiled


def warm() -> dict[str, Any]:
    """Run the migration's warm-up; what compiled (the kernels the cache lacked)."""
    from vfiod.migration.session.switchover_warm_up import warm_source

    t0 = time.monotonic()
    with compiled_kernels() as compiled:
        warm_source()
    return {"seconds": round(time.monotonic() - t0, 3), "compiled": sorted(set(compiled)),
            "cache": cache_dir()}


def run(args: argparse.Namespace) -> int:
    try:
        done = warm()
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile: say which
        return report_error("vfiod kernels", Exit.FAILED,
                            f"a numba kernel did not compile or load: {type(e).__name__}: {e}",
                            as_json=args.json, details={"cache": cache_dir()})
    if args.json:
        print(json.dumps(done, sort_keys=True))
    else:
        what = (f"compiled {len(done['compiled'])} kernels the cache lacked"
                if done["compiled"] else "every kernel loaded from the cache")
        print(f"numba kernels ready in {done['seconds']:.1f} s: {what} ({done['cache']})")
    return int(Exit.OK)
