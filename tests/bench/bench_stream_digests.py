"""Benchmark ``stream_digests``: the stream with the content digests both ends keep
(docs/protocol.md §7.3), the pages hashed once per end against twice, same run.

Each end does what the migration session does with a stop-and-copy pass of the whole
memory (``bench_stream.py`` has the stream alone; the same memfds, loopback TCP, forks):

* ``reread`` (before one hash per page): the source sends, then its ``RamDigests`` reads
  every sent page again; the destination marks every landed record and reads it again
  after the MANIFEST;
* ``fed`` (now): each end's ``RamDigests`` takes the per-page CRCs the stream computed
  (the source's quiescent records, the destination's verified pages) and reads nothing.

Reported per variant, medians of interleaved trials: GB/s, CPU seconds per GiB of each
end, and each end's final re-hash (``source_final_rehash_s`` / ``dest_final_rehash_s``,
inside the downtime in a migration). Both variants' digests must equal a full read (the
run fails otherwise). Ratio: ``fed`` against ``reread`` throughput.

Run alone: ``.venv/bin/python -m tests.bench.bench_stream_digests [--quick]``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from typing import Any

from tests.bench.bench_stream import BATCH, PAGE, RECORD, _cpu, _guest_memory, _header
from vfiod.migration.session.digest import RamDigests
from vfiod.migration.stream import Complete, GuestRam, RamLoaded, StreamReader, StreamWriter
from vfiod.migration.stream import crc32c as crcmod
from vfiod.migration.stream.pagecrc import page_crcs
from vfiod.migration.transport import AckStage, ControlMessage, connect
from vfiod.migration.transport.tcp import Connection
from vfiod.vfio import RamRegion

MODES = ("reread", "fed")


def _full(size: int, view: memoryview) -> str:
    d = RamDigests((RamRegion("ram0", 0, size),), [view], PAGE)
    d.touch_range(0, size // PAGE)
    d.rehash()
    return d.roots()[0].digest


def _destination(lsock: socket.socket, size: int, mode: str, ready: Any, out: Any) -> None:
    k, fd, mm = _guest_memory(size, fill=False)
    view = memoryview(mm)
    sock, addr = lsock.accept()
    conn = Connection(sock, str(addr))
    ready.set()
    c0 = _cpu()
    regions = (RamRegion("ram0", 0, size),)
    dg = RamDigests(regions, [view], PAGE)
    r = StreamReader(conn)
    r.read_header()
    r.attach_ram(GuestRam(PAGE, regions, [view], writable=True),
                 crcs=dg if mode == "fed" else None)
    for ev in r.events():
        if isinstance(ev, RamLoaded) and mode == "reread":
            dg.touch_range(ev.first_page, ev.count)
        elif isinstance(ev, Complete):
            t0 = time.perf_counter()
            dg.rehash()
            rehash_s = time.perf_counter() - t0
            conn.send_control(ControlMessage.ack(AckStage.RESUMED, ev.manifest.ram_bytes))
    cpu = _cpu() - c0
    out.put((cpu, rehash_s, dg.roots()[0].digest, _full(size, view)))
    conn.close()
    k.close(fd)


def _one(size: int, mode: str, src: memoryview) -> dict[str, Any]:
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    ctx = mp.get_context("fork")
    ready, out = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_destination, args=(lsock, size, mode, ready, out))
    child.start()
    lsock.close()
    conn = connect("127.0.0.1", port)
    if not ready.wait(120):
        raise RuntimeError("destination did not get ready")
    regions = (RamRegion("ram0", 0, size),)
    t0, c0 = time.perf_counter(), _cpu()
    dg = RamDigests(regions, [src], PAGE)
    w = StreamWriter(conn, _header(size), GuestRam(PAGE, regions, [src]), record_bytes=RECORD,
                     batch_bytes=BATCH)
    if mode == "fed":
        w.attach_crc_sink(dg)
    w.start()
    w.send_ram([(0, size // PAGE)], quiescent=True)
    if mode == "reread":
        dg.touch_range(0, size // PAGE)
    w.finish()
    t1 = time.perf_counter()
    dg.rehash()
    src_rehash_s = time.perf_counter() - t1
    conn.wait_ack(AckStage.RESUMED, timeout=300)
    dt = time.perf_counter() - t0
    src_cpu = _cpu() - c0
    dst_cpu, dst_rehash_s, dst_digest, dst_full = out.get(timeout=60)
    conn.close()
    child.join(60)
    if child.exitcode != 0:
        raise RuntimeError(f"{mode} destination exited with {child.exitcode}")
    if not dg.roots()[0].digest == dst_digest == dst_full:
        raise RuntimeError(f"{mode}: the digests differ from a full read")
    return {"gbs": size / dt / 1e9, "src_cpu": src_cpu, "dst_cpu": dst_cpu,
            "src_rehash_s": src_rehash_s, "dst_rehash_s": dst_rehash_s}


def run(quick: bool = False, reps: int | None = None) -> list[dict[str, Any]]:
    """Interleaved trials (reread, fed) x ``reps``; medians, each with its range."""
    size = (256 << 20) if quick else (1 << 30)
    trials = reps or (3 if quick else 7)
    crcmod.warm_up()
    page_crcs(memoryview(bytearray(3 * PAGE)), PAGE)     # loaded before the forks
    k, fd, mm = _guest_memory(size, fill=True)
    src = memoryview(mm)
    got: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    try:
        for _ in range(trials):
            for mode in MODES:
                got[mode].append(_one(size, mode, src))
    finally:
        del src, mm
        k.close(fd)
    gib = (1 << 30) / size

    def figure(mode: str, key: str, scale: float = 1.0) -> list[float]:
        xs = [x[key] * scale for x in got[mode]]
        return [round(statistics.median(xs), 6), round(min(xs), 6), round(max(xs), 6)]

    ratios = [f["gbs"] / r["gbs"] for f, r in zip(got["fed"], got["reread"], strict=True)]
    row: dict[str, Any] = {
        "name": "stream_digests", "value": figure("fed", "gbs")[0], "unit": "GB/s",
        "baseline": "the same stream with each end reading every page again for its "
                    "digests (reread), same run",
        "baseline_value": figure("reread", "gbs")[0],
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(x, 3) for x in ratios], "bytes": size, "trials": trials,
        "note": "[median, min, max] per figure; CPU-s per GiB; final re-hash seconds"}
    for mode in MODES:
        row[f"{mode}_src_cpu_s_per_gib"] = figure(mode, "src_cpu", gib)
        row[f"{mode}_dst_cpu_s_per_gib"] = figure(mode, "dst_cpu", gib)
        row[f"{mode}_source_final_rehash_s"] = figure(mode, "src_rehash_s")
        row[f"{mode}_dest_final_rehash_s"] = figure(mode, "dst_rehash_s")
    return [row]


def benchmarks() -> list[tuple[str, Any]]:
    return [("stream_digests", run)]


if __name__ == "__main__":
    import json
    for r in run(quick="--quick" in sys.argv):
        print(json.dumps(r))
    os._exit(0)
