"""Benchmark ``stream_channels_N``: the RAM stream over N channels vs N raw sockets, same
run (docs/protocol.md §12, issue 15).

A source process sends 1 GiB of guest RAM (256 MiB with ``--quick``) to a destination
process over loopback TCP, for N = 1, 2 and 4:

* baseline ``raw``: N connections, each carrying a contiguous 1/N of the memory with
  ``socket.sendmsg`` from one thread per connection, received with ``recv_into`` straight
  into the destination's memory by one thread per connection; no framing, no checksum;
* ``stream_channels_1``: for reference, the single-connection stream (RAM on the main
  connection, no channel) against one raw socket;
* ``stream_channels_N``: ``StreamWriter`` on a main connection (preamble, HEADER,
  MANIFEST), N RAM channels (``ChannelFanout``: one sending thread each, CRC tables
  computed there) and on the destination ``ChannelGather`` (one receiving thread each,
  per-page CRCs checked there), the final barrier, the manifest with the channels'
  tallies verified, an ACK on the return path; stop-and-copy mode.

Guest memory is a memfd on both ends, pre-faulted. Both variants run back to back in
each trial; the ratio is taken within a trial and the median and range are reported, with
the CPU seconds per GiB of each end (``getrusage`` of the process: all its threads).

Run alone: ``.venv/bin/python -m tests.bench.bench_channels [--quick]``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time
from typing import Any

from tests.bench.bench_stream import _cpu, _guest_memory, end_trial
from vfiod.migration.stream import Complete, GuestRam, StreamHeader, StreamReader, StreamWriter
from vfiod.migration.stream import crc32c as crcmod
from vfiod.migration.stream.channel_hello import ChannelHello, read_channel_hello
from vfiod.migration.stream.pagecrc import page_crcs
from vfiod.migration.stream.records import PREAMBLE_SIZE, RECORD_HEADER_SIZE
from vfiod.migration.transport import AckStage, ControlMessage, connect
from vfiod.migration.transport.channel_receive import ChannelGather, ChannelReader
from vfiod.migration.transport.channel_send import ChannelFanout, ChannelWriter
from vfiod.migration.transport.tcp import Connection
from vfiod.vfio import RamRegion

PAGE = 4096
BATCH = 16 << 20
RECORD = 4 << 20
#: 1: the single-connection stream and one raw socket, for reference in the same run
CHANNELS = (1, 2, 4)


def _header(size: int, channels: int) -> StreamHeader:
    return StreamHeader("bench-src", "bench", "bench-guest", PAGE,
                        (RamRegion("ram0", 0, size),), (), channels=channels)


def _accept(lsock: socket.socket) -> Connection:
    sock, addr = lsock.accept()
    return Connection(sock, str(addr))


def _raw_receive(conn: Connection, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            raise SystemExit("raw receiver: early EOF")
        got += n


def _destination(lsock: socket.socket, size: int, n: int, mode: str, ready: Any,
                 cpu_q: Any) -> None:
    k, fd, mm = _guest_memory(size, fill=False)
    view = memoryview(mm)
    main = _accept(lsock)
    ready.set()
    c0 = _cpu()
    if mode == "raw":
        conns = [main] + [_accept(lsock) for _ in range(n - 1)]
        part = size // n
        threads = [threading.Thread(target=_raw_receive, args=(c, view[i * part:(i + 1) * part]))
                   for i, c in enumerate(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        main.send_control(ControlMessage.ack(AckStage.RESUMED, size))
    else:
        r = StreamReader(main)
        h = r.read_header()
        ram = GuestRam(PAGE, h.regions, [view], writable=True)
        r.attach_ram(ram)
        readers = []
        for _ in range(n if n > 1 else 0):
            c = _accept(lsock)
            hello = read_channel_hello(c)
            opening = PREAMBLE_SIZE + RECORD_HEADER_SIZE + len(hello.to_json())
            readers.append(ChannelReader(hello.channel, c, ram, offset=opening))
        readers.sort(key=lambda x: x.index)
        if readers:
            r.attach_channels(ChannelGather(readers, timeout_s=120))
        for ev in r.events():
            if isinstance(ev, Complete):
                main.send_control(ControlMessage.ack(AckStage.RESUMED, ev.manifest.ram_bytes))
    cpu_q.put(_cpu() - c0)
    main.close()
    k.close(fd)


def _raw_send(conn: Connection, view: memoryview) -> None:
    for off in range(0, len(view), BATCH):
        end = min(len(view), off + BATCH)
        conn.send_buffers([view[o:min(o + RECORD, end)] for o in range(off, end, RECORD)])


def _one(size: int, n: int, mode: str, src: memoryview) -> tuple[float, float, float]:
    """(GB/s, source CPU s, destination CPU s) of one transfer over ``n`` connections."""
    lsock = socket.create_server(("127.0.0.1", 0), backlog=16)
    port = lsock.getsockname()[1]
    ctx = mp.get_context("fork")
    ready, cpu_q = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_destination, args=(lsock, size, n, mode, ready, cpu_q))
    child.start()
    lsock.close()
    main = connect("127.0.0.1", port)
    if not ready.wait(120):
        raise RuntimeError("destination did not get ready")
    t0, c0 = time.perf_counter(), _cpu()
    if mode == "raw":
        conns = [main] + [connect("127.0.0.1", port) for _ in range(n - 1)]
        part = size // n
        threads = [threading.Thread(target=_raw_send, args=(c, src[i * part:(i + 1) * part]))
                   for i, c in enumerate(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        ram = GuestRam(PAGE, (RamRegion("ram0", 0, size),), [src])
        w = StreamWriter(main, _header(size, n), ram, record_bytes=RECORD, batch_bytes=BATCH)
        w.start()
        writers = []
        for i in range(1, n + 1 if n > 1 else 1):
            c = connect("127.0.0.1", port)
            c.send_buffers(ChannelHello("bench", "", i, n).opening())
            writers.append(ChannelWriter(i, c, PAGE))
        if writers:
            w.attach_channels(ChannelFanout(writers))
        w.send_ram([(0, size // PAGE)], quiescent=True)
        w.finish()
    return end_trial(main, size, t0, c0, cpu_q, child, f"{mode} x{n}")


def run(quick: bool = False, reps: int | None = None) -> list[dict[str, Any]]:
    size = (256 << 20) if quick else (1 << 30)
    trials = reps or (3 if quick else 5)
    crcmod.warm_up()
    page_crcs(memoryview(bytearray(3 * PAGE)), PAGE)   # loaded before the forks
    k, fd, mm = _guest_memory(size, fill=True)
    src = memoryview(mm)
    keys = [(mode, n) for n in CHANNELS for mode in ("raw", "stream")]
    gbs: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
    cpus: dict[tuple[str, int], list[tuple[float, float]]] = {key: [] for key in keys}
    try:
        for _ in range(trials):
            for mode, n in keys:
                rate, s_cpu, d_cpu = _one(size, n, mode, src)
                gbs[mode, n].append(rate)
                cpus[mode, n].append((s_cpu, d_cpu))
    finally:
        del src, mm
        k.close(fd)
    gib = (1 << 30) / size

    def per_gib(key: tuple[str, int], end: int) -> float:
        return round(statistics.median(c[end] for c in cpus[key]) * gib, 3)

    out = []
    for n in CHANNELS:
        ratios = [s / r for s, r in zip(gbs["stream", n], gbs["raw", n], strict=True)]
        out.append({
            "name": f"stream_channels_{n}", "value": round(statistics.median(gbs["stream", n]), 3),
            "unit": "GB/s",
            "baseline": f"{n} raw sendmsg/recv_into loopback sockets, a thread per socket on "
                        "each end, same run",
            "baseline_value": round(statistics.median(gbs["raw", n]), 3),
            "ratio": round(statistics.median(ratios), 3),
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "ratios": [round(x, 3) for x in ratios],
            "value_range": [round(min(gbs["stream", n]), 3), round(max(gbs["stream", n]), 3)],
            "bytes": size, "trials": trials, "channels": n,
            "src_cpu_s_per_gib": per_gib(("stream", n), 0),
            "dst_cpu_s_per_gib": per_gib(("stream", n), 1),
            "raw_src_cpu_s_per_gib": per_gib(("raw", n), 0),
            "raw_dst_cpu_s_per_gib": per_gib(("raw", n), 1),
            # against the single-connection stream of the same trials: do channels pay here?
            "vs_one_connection": round(statistics.median(
                s / one for s, one in zip(gbs["stream", n], gbs["stream", 1], strict=True)), 3),
            "cpus": os.cpu_count(), "crc32c": crcmod.IMPLEMENTATION})
    return out


def benchmarks() -> list[tuple[str, Any]]:
    return [("stream_channels", run)]


if __name__ == "__main__":
    import json
    for row in run(quick="--quick" in sys.argv):
        print(json.dumps(row))
    os._exit(0)
