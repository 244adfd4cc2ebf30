"""``make bench``: run the benchmarks, print one JSON row per line, save them all.

    python -m tests.bench.run [-k NAME ...] [--quick] [--size-log2 N] [--reps N]
                              [--out PATH] [--list]

Benchmarks live in ``tests/bench/bench_*.py``; adding a file is enough to register more,
run.py never changes. A module registers either

* ``benchmarks() -> list[(name, callable)]``, or
* top-level functions ``bench_<name>(...)``.

A module that fails to import is reported as a failed benchmark named after its file.

Each callable returns one result dict or a list of them, and may declare any of the
parameters ``quick``, ``size_log2``, ``reps`` (values from the command line; the others
are not passed). A benchmark that cannot run here raises ``timing.BenchSkip(reason)``.

Rows (stdout, one JSON object per line, and ``.bench/results.json`` as one list):
``{"name", "value", "unit", "baseline", "baseline_value", "ratio"}`` plus optional keys
such as ``note`` and ``target_ratio``. Baselines are measured in the same run. Skips and
errors go to stderr; the exit status is 1 if any benchmark failed or returned a bad row.

Before the first benchmark the harness runs ``vfiod kernels``, as a host's systemd unit
does before its daemon (README "numba's cache"): numba's cache is keyed by each source
file's path and time, so on a fresh clone every daemon a benchmark starts would otherwise
compile its kernels inside the migration it measures. ``--no-kernels`` leaves the cache
as it is (``numba_first_call_cached`` always uses empty caches of its own).

``-k NAME`` (repeatable) runs the benchmarks whose registered name contains NAME.
``VFIOD_BENCH_SIZE_LOG2`` sets the default of ``--size-log2`` (bitmap bits, 2^28 = 1 TiB
of 4 KiB pages); the pytest smoke test uses tiny sizes that way.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent
# Like tests/conftest.py: numba's cache lives in the project unless told otherwise.
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba"))

from tests.bench.timing import BenchConfig, BenchSkip, schema_errors  # noqa: E402
from tests.support.daemons import vfiod_cmd  # noqa: E402

Bench = tuple[str, Callable[..., Any]]


def discover() -> list[Bench]:
    """Every registered benchmark, by module file name then registration order."""
    found: list[Bench] = []
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        try:
            mod = importlib.import_module(f"tests.bench.{path.stem}")
        except Exception as e:  # one broken module must not hide the others' results
            found.append((path.stem, functools.partial(_raise, e)))
            continue
        if hasattr(mod, "benchmarks"):
            found.extend((str(n), f) for n, f in mod.benchmarks())
            continue
        for attr, fn in vars(mod).items():
            if attr.startswith("bench_") and inspect.isfunction(fn) and fn.__module__ == mod.__name__:
                found.append((attr.removeprefix("bench_"), fn))
    return found


def _raise(exc: BaseException) -> None:
    raise exc


def _call(fn: Callable[..., Any], cfg: BenchConfig) -> list[Any]:
    params = inspect.signature(fn).parameters
    kwargs = {k: getattr(cfg, k) for k in ("quick", "size_log2", "reps") if k in params}
    out = fn(**kwargs)
    return out if isinstance(out, list) else [out]


def warm_kernels() -> bool:
    """``vfiod kernels`` in a child process, with this run's ``NUMBA_CACHE_DIR``; says on
    stderr what it took, or why it failed (the benchmarks then run anyway, compiling
    where they need to)."""
    started = time.monotonic()
    p = subprocess.run(vfiod_cmd("kernels"), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    took = time.monotonic() - started
    if p.returncode != 0:
        print(f"vfiod kernels failed (exit {p.returncode}, {took:.1f} s): "
              f"{(p.stderr or p.stdout).strip()[-400:]}", file=sys.stderr, flush=True)
        return False
    print(f"vfiod kernels: {took:.1f} s", file=sys.stderr, flush=True)
    return True


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n")[0])
    p.add_argument("-k", dest="keywords", action="append", default=[],
                   help="run benchmarks whose name contains this (repeatable)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    env_size = os.environ.get("VFIOD_BENCH_SIZE_LOG2")
    p.add_argument("--size-log2", type=int, default=int(env_size) if env_size else None,
                   help="bitmap size in bits, log2 (default 28 = 1 TiB of 4 KiB pages; 24 with --quick)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per side (default 5; 2 with --quick)")
    p.add_argument("--out", type=Path, default=ROOT / ".bench" / "results.json")
    p.add_argument("--list", action="store_true", help="print the registered names and exit")
    p.add_argument("--no-kernels", action="store_true",
                   help="do not run `vfiod kernels` first (numba's cache as it is)")
    args = p.parse_args(argv)
    if args.size_log2 is not None and not 8 <= args.size_log2 <= 34:
        p.error(f"--size-log2 must be in [8, 34], got {args.size_log2}")
    if args.reps is not None and args.reps < 1:
        p.error(f"--reps must be >= 1, got {args.reps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    benches = discover()
    if args.list:
        for name, _ in benches:
            print(name)
        return 0
    if args.keywords:
        benches = [(n, f) for n, f in benches if any(k in n for k in args.keywords)]
        if not benches:
            print(f"no benchmark matches -k {' -k '.join(args.keywords)}", file=sys.stderr)
            return 2
    cfg = BenchConfig(size_log2=args.size_log2 or (24 if args.quick else 28),
                      reps=args.reps or (2 if args.quick else 5), quick=args.quick)
    rows: list[dict[str, Any]] = []
    failed = False
    if not args.no_kernels:
        warm_kernels()
    for name, fn in benches:
        try:
            results = _call(fn, cfg)
        except BenchSkip as e:
            print(json.dumps({"name": name, "skipped": str(e)}), file=sys.stderr, flush=True)
            continue
        except Exception:
            failed = True
            print(f"benchmark {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            continue
        for r in results:
            errs = schema_errors(r)
            if errs:
                failed = True
                print(f"benchmark {name} returned a bad row {r!r}: {'; '.join(errs)}",
                      file=sys.stderr, flush=True)
                continue
            rows.append(r)
            print(json.dumps(r), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
