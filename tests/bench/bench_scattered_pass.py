"""Benchmark ``stream_scattered_pass``: a final pass of scattered pages, RAM_RUNS records
against one record per run, same run (docs/protocol.md §5.4; issue 15 items 1 and 3).

A sparse or idle guest's final pass is hundreds or thousands of short runs scattered over
its RAM, sent while it is paused. With one RAM record per run, each run costs both ends a
record's header, table and Python work; RAM_RUNS records share those among up to a
record's pages. Each case sends the same runs of a 16 GiB mapping (only the sent pages
are ever touched) from a ``StreamWriter`` to a ``StreamReader`` over loopback TCP, both
in this process (the reader on a thread, as the destination's reader runs beside its
session), with the content digests attached on both ends as a migration has them, and
times the pass from the first send to the destination's MANIFEST. The two framings
alternate within each trial (``group_below_pages`` 64, the default, against 0: every
run in a RAM record of its own, as to a destination that does not offer RAM_RUNS); the
ratio is taken per trial and the median and range over the trials are reported, with
each end's CPU time per run.

Run alone: ``.venv/bin/python -m tests.bench.bench_scattered_pass [--quick]``.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np

from tests.support.loopback import loopback_pair
from vfiod.kernel.linux import LinuxKernel
from vfiod.migration.session.digest import RamDigests
from vfiod.migration.stream import Complete, GuestRam, StreamHeader, StreamReader, StreamWriter
from vfiod.migration.stream.ram_framing import GROUP_BELOW_PAGES
from vfiod.vfio import RamRegion

PAGE = 4096
SIZE = 16 << 30
#: (runs, longest run in pages): a sparse guest's final pass in the prediction bench
#: (about 60 runs of up to 20 pages), a few hundred short runs, a thousand single pages
CASES = ((60, 20), (300, 3), (2000, 1))


def _runs(n: int, longest: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    firsts = np.sort(rng.choice(SIZE // PAGE // 64, n, replace=False)) * 64
    return np.stack([firsts, rng.integers(1, longest + 1, n)], axis=1).astype(np.uint64)


def _pass(src: Any, dst: Any, runs: np.ndarray, below: int) -> tuple[float, float, float]:
    """One pass; (wall s, source CPU s, destination CPU s)."""
    region = (RamRegion("ram", 0, SIZE),)
    a, b = loopback_pair()
    for sock, opt in ((a._sock, socket.SO_SNDBUF), (b._sock, socket.SO_RCVBUF)):
        sock.setsockopt(socket.SOL_SOCKET, opt, 16 << 20)
    header = StreamHeader("bench", "bench", "bench", PAGE, region, (), challenge="c",
                          ram_runs=True)
    writer = StreamWriter(a, header, GuestRam(PAGE, region, [src]), record_bytes=4 << 20,
                          batch_bytes=4 << 20, group_below_pages=below)
    writer.attach_crc_sink(RamDigests(region, [src], PAGE))
    writer.start()
    reader = StreamReader(b)
    reader.read_header()
    reader.attach_ram(GuestRam(PAGE, region, [dst], writable=True),
                      crcs=RamDigests(region, [dst], PAGE))
    got: dict[str, Any] = {}

    def receive() -> None:
        c0 = time.thread_time()
        got["last"] = list(reader.events())[-1]
        got["end"], got["cpu"] = time.perf_counter(), time.thread_time() - c0

    t = threading.Thread(target=receive)
    t.start()
    t0, c0 = time.perf_counter(), time.thread_time()
    writer.send_ram(runs, quiescent=True)
    writer.finish()
    cpu = time.thread_time() - c0
    t.join()
    a.close()
    b.close()
    if not isinstance(got.get("last"), Complete):
        raise RuntimeError("the scattered pass did not reach its MANIFEST")
    return got["end"] - t0, cpu, got["cpu"]


def run(quick: bool = False) -> list[dict[str, Any]]:
    k = LinuxKernel()
    mems = []
    for name in ("src", "dst"):
        fd = k.memfd_create(f"vfiod-bench-{name}", SIZE)
        mems.append(memoryview(k.mmap(fd, SIZE)))
    src, dst = mems
    trials = 3 if quick else 7
    rows = []
    for n, longest in CASES:
        runs = _runs(n, longest, seed=n)
        for f, c in runs.tolist():          # the pages a pass sends hold data, on both ends
            src[f * PAGE:(f + c) * PAGE] = b"\x5a" * (c * PAGE)
            dst[f * PAGE:(f + c) * PAGE] = b"\x01" * (c * PAGE)
        _pass(src, dst, runs, GROUP_BELOW_PAGES)      # the kernels, loaded once
        per: dict[int, list[tuple[float, float, float]]] = {GROUP_BELOW_PAGES: [], 0: []}
        for _ in range(trials):
            for below in (GROUP_BELOW_PAGES, 0):
                per[below].append(_pass(src, dst, runs, below))
        ratios = [old[0] / new[0] for new, old in zip(per[GROUP_BELOW_PAGES], per[0],
                                                       strict=True)]

        def med(below: int, i: int, scale: float = 1e3,
                per: dict[int, list[tuple[float, float, float]]] = per) -> float:
            return round(statistics.median(x[i] for x in per[below]) * scale, 3)

        pages = int(runs[:, 1].sum())
        rows.append({
            "name": f"stream_scattered_pass_{n}", "value": med(GROUP_BELOW_PAGES, 0),
            "unit": "ms", "baseline": "one RAM record per run (same run)",
            "baseline_value": med(0, 0), "ratio": round(statistics.median(ratios), 3),
            "note": (f"{n} runs, {pages} pages over 16 GiB, {trials} trials alternating; "
                     f"ratio = one record per run / RAM_RUNS, trials "
                     f"{min(ratios):.2f}-{max(ratios):.2f}; CPU us per run, source "
                     f"{med(GROUP_BELOW_PAGES, 1, 1e6 / n):.1f} vs {med(0, 1, 1e6 / n):.1f},"
                     f" destination {med(GROUP_BELOW_PAGES, 2, 1e6 / n):.1f} vs "
                     f"{med(0, 2, 1e6 / n):.1f}"),
            "distribution": [round(r, 3) for r in ratios]})
    return rows


def benchmarks() -> list[tuple[str, Any]]:
    return [("stream_scattered_pass", run)]


if __name__ == "__main__":
    import json
    for r in run(quick="--quick" in sys.argv):
        print(json.dumps(r))
    os._exit(0)
