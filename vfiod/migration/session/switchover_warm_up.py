"""A rehearsal of the switchover's own code, in memory, before the guest pauses
(docs/architecture.md §4 "fixed costs measured on this path"; §1.5).

The code a migration runs between the pause and the destination's ACK resumed (the
stream's end, the destination's MANIFEST check, both ends' content digests and the
confirmed switchover's control frames) runs nowhere else, so in a fresh process its first
run is paid inside the first downtime, which no earlier measurement can predict. On the
real-kernel tier (Linux under QEMU TCG) the stream's end of a fresh process's first
migration took a median 9.2 ms over nine fresh processes, 5-6 ms with this rehearsal
(docs/benchmarks.md §5).

``warm_switchover()`` runs that code on a one-page guest with one device: a stream from
HEADER to MANIFEST through ``StreamWriter`` and back through ``StreamReader``, the content
digests of both ends and their comparison, and each control frame of the switchover
(DIGESTS, ACK prepared, COMMIT, ACK resumed, REPORT) encoded and parsed. It touches no
device, socket or kernel, so the protocol sees nothing of it; its buffers are of the
kinds a migration passes, so numba needs no kernel it would not load anyway. The
destination calls it before its HELLO; the source calls ``warm_source()`` in its setup,
which first compiles or loads the bitmap kernels (``bitmap_kernels.warm_up``: the first
dirty sync is timed for the prediction) and the count of pages never sent
(``RamDigests.never_landed``, in every prediction), then rehearses.

The source's runs twice and returns the second run's times (``SwitchoverRehearsal``):
the stream's end (END_OF_STATE and MANIFEST), the verify (both ends' last digest fold
and the compare) and what a run of dirty pages costs beyond its bytes (``run_s``: a
final pass of ``REHEARSED_RUNS`` single pages against one run of as many pages, written
and landed, the slower end's extra per run: a final pass of scattered pages costs that
per run on top of the first pass's bulk rate); the destination's runs once, as it needs
no times. The stream's end and the verify have no sample before the guest pauses, so a
source with no earlier switchover predicted them as nothing; the rehearsal's times are
its estimate until its history has one (``SwitchoverHistory.correct``); the runs' price
is counted in every prediction (``phases.final_pass_overheads``). They are this
host's CPU for the same code, without the socket: a lower bound of the real parts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vfiod.dirty import bitmap_kernels
from vfiod.migration.session import digest
from vfiod.migration.session.digest import RamDigests, RegionDigest, compare_roots
from vfiod.migration.stream import (
    Complete,
    DeviceInfo,
    GuestRam,
    StreamHeader,
    StreamReader,
    StreamWriter,
    ram_landing,
)
from vfiod.migration.transport.control import AckStage, ControlMessage, ControlParser
from vfiod.vfio import RamRegion

_PAGE = 4096
_DEVICE = "warm-up"
REHEARSED_RUNS = 128


class _Pipe:
    """The stream's sink and source over one buffer (what is written is read back)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._at = 0

    def send_buffers(self, buffers: Sequence[Any]) -> None:
        for b in buffers:
            self.data += b

    def check_peer(self) -> None:
        pass

    def recv_into(self, view: memoryview) -> int:
        n = min(len(view), len(self.data) - self._at)
        with memoryview(self.data) as data:       # no copy of the slice on the way
            view[:n] = data[self._at:self._at + n]
        self._at += n
        return n


@dataclass(frozen=True)
class SwitchoverRehearsal:
    """Seconds the rehearsal's second run took for the stream's end (END_OF_STATE and
    MANIFEST, after the last RAM) and for the verify (the last digest folds, the roots
    and their compare)."""

    stream_end_s: float = 0.0
    verify_s: float = 0.0
    run_s: float = 0.0           # per run of a scattered final pass, beyond its bytes

    def figures(self) -> dict[str, float]:
        """For the migration's timings."""
        return {"rehearsed_stream_end_s": self.stream_end_s,
                "rehearsed_verify_s": self.verify_s, "rehearsed_run_s": self.run_s}


def warm_switchover(*, timed: bool = False) -> SwitchoverRehearsal:
    """Run the switchover's stream, digest and control code once, in memory; ``timed``:
    once more, and return that run's times (the first pays the first run's costs), else
    no times."""
    ram_landing.warm_up()
    _rehearse()
    _rehearse_runs(trials=1)
    if not timed:
        return SwitchoverRehearsal()
    done = _rehearse()
    return SwitchoverRehearsal(done.stream_end_s, done.verify_s, _rehearse_runs())


def _rehearse() -> SwitchoverRehearsal:
    region = RamRegion("warm-up", 0, 4 * _PAGE)
    header = StreamHeader("warm-up", "warm-up", "warm-up", _PAGE, (region,),
                          (DeviceInfo(_DEVICE, "v2"),), challenge="warm-up", pass_acks=True,
                          ram_runs=True)
    # memoryviews of writable memory, as a guest's RAM mappings are
    # page 1 is never written, so never sent: the final pass is two runs, one RAM_RUNS
    src_mem = memoryview(bytearray(b"\x5a" * _PAGE + bytes(_PAGE) + b"\x5b" * 2 * _PAGE))
    dst_mem = memoryview(bytearray(4 * _PAGE))
    sent = RamDigests((region,), [src_mem], _PAGE)
    landed = RamDigests((region,), [dst_mem], _PAGE)
    pipe = _Pipe()
    writer = StreamWriter(pipe, header, GuestRam(_PAGE, (region,), [src_mem]),
                          record_bytes=4 * _PAGE, batch_bytes=4 * _PAGE)
    writer.start()
    writer.attach_crc_sink(sent)
    writer.send_device_data(_DEVICE, b"\0" * 64)          # its first chunk: the identity
    writer.mark_iteration(1)
    # the stop-and-copy's part: quiescent RAM, the device's last data, its end, MANIFEST
    writer.send_ram(np.array([[0, 1], [2, 2]], dtype=np.uint64), quiescent=True)
    writer.send_device_data(_DEVICE, b"\1" * 64)
    t0 = time.perf_counter()
    writer.end_of_state(_DEVICE)
    manifest = writer.finish()
    stream_end_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sent.rehash()
    theirs = [RegionDigest.from_dict(r.to_dict()) for r in sent.roots()]
    verify_s = time.perf_counter() - t0
    reader = StreamReader(pipe)
    reader.read_header()
    reader.attach_ram(GuestRam(_PAGE, (region,), [dst_mem], writable=True), crcs=landed)
    events = list(reader.events())
    reader.stop_channels()
    t0 = time.perf_counter()
    landed.rehash()
    differ = compare_roots(theirs, landed.roots())
    verify_s += time.perf_counter() - t0
    if (events[-1] != Complete(manifest) or bytes(dst_mem) != bytes(src_mem)
            or manifest.ram_bytes != 3 * _PAGE or manifest.device_bytes != 128):
        raise RuntimeError("the switchover warm-up's stream did not round-trip")
    if differ:
        raise RuntimeError("the switchover warm-up's content digests differ")
    sent.figures("source_")
    landed.figures("")
    frames = [
        ControlMessage.digests(manifest.records, [r.to_dict() for r in theirs],
                               predicted_downtime_s=0.001),
        ControlMessage.ack(AckStage.PREPARED, verified=True, verification={"records": 1},
                           timings={"load_s": 0.001}),
        ControlMessage.commit("warm-up", "warm-up"),
        ControlMessage.ack(AckStage.RESUMED, timings={"resume_s": 0.001}),
        ControlMessage.report(0.002, 0.001, 0.5),
    ]
    parsed = ControlParser("warm-up").feed(b"".join(f.encode() for f in frames))
    if parsed != frames:
        raise RuntimeError("the switchover warm-up's control frames did not round-trip")
    return SwitchoverRehearsal(stream_end_s, verify_s)


def _send_and_land(runs: np.ndarray, src_mem: memoryview, dst_mem: memoryview
                   ) -> tuple[float, float]:
    """Seconds to write ``runs`` (first page, count) of the guest ``src_mem`` as one
    quiescent pass, and to land them in ``dst_mem``, each end's own part."""
    region = RamRegion("warm-up-runs", 0, len(src_mem))
    header = StreamHeader("warm-up", "warm-up", "warm-up", _PAGE, (region,), (),
                          challenge="warm-up", pass_acks=True, ram_runs=True)
    pipe = _Pipe()
    writer = StreamWriter(pipe, header, GuestRam(_PAGE, (region,), [src_mem]),
                          record_bytes=len(src_mem), batch_bytes=len(src_mem))
    writer.start()
    writer.attach_crc_sink(RamDigests((region,), [src_mem], _PAGE))
    t0 = time.perf_counter()
    writer.send_ram(runs, quiescent=True)
    send_s = time.perf_counter() - t0
    writer.finish()
    reader = StreamReader(pipe)
    reader.read_header()
    reader.attach_ram(GuestRam(_PAGE, (region,), [dst_mem], writable=True),
                      crcs=RamDigests((region,), [dst_mem], _PAGE))
    np.frombuffer(dst_mem, dtype=np.uint8)[:] = 0      # lands on zeros, as a guest's would
    t0 = time.perf_counter()
    for _ in reader.events():
        pass
    land_s = time.perf_counter() - t0
    reader.stop_channels()
    if bytes(dst_mem[:_PAGE]) != bytes(src_mem[:_PAGE]):
        raise RuntimeError("the switchover warm-up's runs did not round-trip")
    return send_s, land_s


def _rehearse_runs(trials: int = 2) -> float:
    """Seconds a run of dirty pages costs beyond its bytes: ``REHEARSED_RUNS`` single
    pages (every other page) against one run of as many, each ``trials`` times, the best
    of each; the slower end's extra per run (the two ends work at once)."""
    n = REHEARSED_RUNS
    single = np.stack([np.arange(0, 2 * n, 2, dtype=np.uint64),
                       np.ones(n, dtype=np.uint64)], axis=1)
    one = np.array([[0, n]], dtype=np.uint64)
    src = memoryview(bytearray(b"\x5a" * (2 * n * _PAGE)))
    dst = memoryview(bytearray(2 * n * _PAGE))
    times = [(_send_and_land(single, src, dst), _send_and_land(one, src, dst))
             for _ in range(trials)]
    extra = [min(s[end] for s, _ in times) - min(o[end] for _, o in times)
             for end in (0, 1)]
    return max(0.0, *extra) / n


def warm_source() -> SwitchoverRehearsal:
    """The source's warm-up before tracking starts: the bitmap kernels, then the
    switchover's code (its rehearsed times)."""
    bitmap_kernels.warm_up()
    digest.warm_up()          # each prediction counts the pages never sent with it
    return warm_switchover(timed=True)
