"""Stream round trips: what the writer sends is what the reader loads (docs/architecture.md §5)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import pytest

from tests.support.mem_pipe import MemPipe
from vfiod.kernel.linux import LinuxKernel
from vfiod.migration.stream import (
    Complete,
    DeviceData,
    DeviceInfo,
    EndOfState,
    GuestRam,
    IterationMark,
    Limits,
    RamLoaded,
    StreamHeader,
    StreamReader,
    StreamWriter,
)
from vfiod.migration.stream.records import RECORD_HEADER_SIZE, ErrorCode, RecordError
from vfiod.migration.transport import FileSink, FileSource
from vfiod.vfio import RamRegion

PS = 4096


REGIONS = (RamRegion("low", 0, 64 * PS), RamRegion("high", 0x100000, 32 * PS),
           RamRegion("adjacent", 0x100000 + 32 * PS, 16 * PS))
DEVICES = (DeviceInfo("0000:3b:00.1", "v2", 0b111, {"vendor": "0x15b3", "device": "0x101e"},
                      ("PRE_COPY", "P2P"), id="nic0"),
           DeviceInfo("mdev-7", "v1", 0, {"driver": "mtty"}))


def header(regions: tuple[RamRegion, ...] = REGIONS,
           devices: tuple[DeviceInfo, ...] = DEVICES) -> StreamHeader:
    return StreamHeader("src-host", "mig-1", "guest-a", PS, regions, devices)


def guest_memory(seed: int, regions: tuple[RamRegion, ...] = REGIONS) -> list[bytearray]:
    rng = np.random.default_rng(seed)
    return [bytearray(rng.integers(0, 256, r.size, dtype=np.uint8).tobytes()) for r in regions]


def load(pipe: Any, regions: tuple[RamRegion, ...] = REGIONS, **kw: Any
         ) -> tuple[StreamHeader, list[bytearray], list[Any]]:
    r = StreamReader(pipe, **kw)
    h = r.read_header()
    dst = [bytearray(x.size) for x in regions]
    r.attach_ram(GuestRam(PS, h.regions, dst, writable=True))
    events: list[Any] = []
    for ev in r.events():
        if isinstance(ev, DeviceData):
            events.append(("data", ev.device, ev.chunk, bytes(ev.data)))
        else:
            events.append(ev)
    r.expect_end()
    return h, dst, events


def test_full_round_trip_live_and_quiescent() -> None:
    src = guest_memory(1)
    pipe = MemPipe(piece=10_000)
    w = StreamWriter(pipe, header(), GuestRam(PS, REGIONS, src), record_bytes=8 * PS,
                     batch_bytes=32 * PS)
    w.start()
    # pass 1: everything, with a range that runs from "high" into "adjacent"
    assert w.send_ram([(0, 64), (0x100, 48)], quiescent=False) == 112 * PS
    w.send_device_data("0000:3b:00.1", b"precopy-1")
    w.mark_iteration(1)
    # pass 2: a few dirty runs as a numpy (N, 2) array, then the guest "writes" again
    src[0][5 * PS:7 * PS] = b"\xab" * (2 * PS)
    w.send_ram(np.array([[5, 2], [0x110, 3]], dtype=np.uint64), quiescent=False)
    w.mark_iteration(2)
    # stop-and-copy
    src[1][0:PS] = b"\xcd" * PS
    w.send_ram([(0x100, 1)], quiescent=True)
    w.send_device_data("0000:3b:00.1", b"stopcopy")
    w.send_device_data("mdev-7", b"\x00" * 10)
    w.end_of_state("0000:3b:00.1")
    w.end_of_state("mdev-7")
    manifest = w.finish()

    h, dst, events = load(pipe)
    assert h == header()
    assert dst == src
    assert events[-1] == Complete(manifest)
    assert ("data", "0000:3b:00.1", 0, b"precopy-1") in events
    assert ("data", "0000:3b:00.1", 1, b"stopcopy") in events
    assert [e for e in events if isinstance(e, IterationMark)] == [IterationMark(1),
                                                                   IterationMark(2)]
    assert [e for e in events if isinstance(e, EndOfState)] == [
        EndOfState("0000:3b:00.1", 0), EndOfState("mdev-7", 1)]
    # "high" + "adjacent" were cut at the region boundary and into 8-page records
    assert RamLoaded(0x100, 8) in events and RamLoaded(0x120, 8) in events
    assert manifest.ram_bytes == (112 + 2 + 3 + 1) * PS
    assert manifest.device_bytes == len(b"precopy-1stopcopy") + 10
    assert w.records_sent == 1 + sum(1 for e in events)
    assert w.bytes_sent == len(pipe.data)


def test_device_data_is_cut_into_bounded_chunks_in_order() -> None:
    blob = bytes(range(256)) * 40  # 10240 bytes, chunks of 4096
    pipe = MemPipe()
    lim = Limits(device_chunk=4096)
    w = StreamWriter(pipe, header((), DEVICES), None, limits=lim)
    w.start()
    w.send_device_data("mdev-7", blob)
    w.end_of_state("mdev-7")
    w.end_of_state("0000:3b:00.1")
    w.finish()
    r = StreamReader(pipe, limits=lim)
    r.read_header()
    chunks = [(ev.chunk, bytes(ev.data)) for ev in r.events() if isinstance(ev, DeviceData)]
    assert [c for c, _ in chunks] == [0, 1, 2]
    assert b"".join(d for _, d in chunks) == blob


def test_batches_bound_the_number_of_sends() -> None:
    src = guest_memory(2)
    pipe = MemPipe()
    w = StreamWriter(pipe, header(), GuestRam(PS, REGIONS, src), record_bytes=4 * PS,
                     batch_bytes=16 * PS)
    w.start()
    before = pipe.sends
    w.send_ram([(0, 64)], quiescent=True)
    # 64 pages in 16-page batches: 4 sends, not one per page or per record
    assert pipe.sends - before == 4


def _one_big_record(pages: int) -> tuple[tuple[RamRegion, ...], list[bytearray], MemPipe, int]:
    """A stream whose RAM is one record of ``pages`` pages; also where its pages start."""
    regions = (RamRegion("big", 0, pages * PS),)
    src = guest_memory(4, regions)
    pipe = MemPipe()
    w = StreamWriter(pipe, header(regions, ()), GuestRam(PS, regions, src),
                     record_bytes=pages * PS, batch_bytes=pages * PS)
    w.start()
    pages_at = len(pipe.data) + RECORD_HEADER_SIZE + pages * 4  # after its header and table
    w.send_ram([(0, pages)], quiescent=True)
    w.finish()
    return regions, src, pipe, pages_at


@pytest.mark.parametrize("page", [0, 63, 64, 200])
def test_a_bad_page_anywhere_in_a_record_read_in_odd_pieces_is_named(page: int) -> None:
    regions, _, pipe, pages_at = _one_big_record(201)
    pipe.data[pages_at + page * PS + 7] ^= 0x10
    bad = MemPipe(piece=4097)
    bad.data = pipe.data
    with pytest.raises(RecordError) as e:
        load(bad, regions)
    assert e.value.code is ErrorCode.PAYLOAD_CHECKSUM
    assert f"guest page {page:#x} (page {page} of 201 in this record)" in str(e.value)


def test_file_save_and_restore(tmp_path: Any) -> None:
    ops = LinuxKernel()
    src = guest_memory(3)
    path = str(tmp_path / "snap.vfiod")
    with FileSink(ops, path) as sink:
        w = StreamWriter(sink, header(), GuestRam(PS, REGIONS, src))
        w.start()
        w.send_ram([(0, 64), (0x100, 48)], quiescent=True)
        for d in DEVICES:
            w.send_device_data(d.name, d.name.encode() * 3)
            w.end_of_state(d.name)
        w.finish()
        assert sink.bytes_written == w.bytes_sent
    assert os.path.getsize(path) == w.bytes_sent
    with FileSource(ops, path) as source:
        h, dst, events = load(source)
    assert dst == src
    assert ("data", "mdev-7", 0, b"mdev-7mdev-7mdev-7") in events
    # the header is readable JSON for an operator: it starts after 16 + 40 bytes
    blob = open(path, "rb").read()
    doc = json.loads(blob[56:56 + len(header().to_json())])
    assert doc["guest"]["regions"][0] == {"name": "low", "gpa": 0, "size": 64 * PS}


def test_header_json_round_trip_and_validation() -> None:
    h = header()
    assert StreamHeader.from_json(h.to_json()) == h
    bad = [
        (dict(page_size=3000), "page_size"),
        (dict(regions=(RamRegion("a", 0, PS), RamRegion("a", PS, PS))), "repeated"),
        (dict(regions=(RamRegion("a", 0, 2 * PS), RamRegion("b", PS, PS))), "overlaps"),
        (dict(regions=(RamRegion("a", 100, PS),)), "multiples"),
        (dict(devices=(DeviceInfo("d", "v3"),)), "protocol"),
    ]
    for change, msg in bad:
        kw = dict(source_host="s", migration_id="m", guest="g", page_size=PS,
                  regions=REGIONS, devices=DEVICES)
        kw.update(change)
        with pytest.raises(ValueError, match=msg):
            StreamHeader(**kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="guest.page_size"):
        StreamHeader.from_json(h.to_json().replace(b'"page_size":4096', b'"page_size":"x"'))
    with pytest.raises(ValueError, match="not UTF-8 JSON"):
        StreamHeader.from_json(b"\xff{")


def test_header_asks_for_pass_acknowledgements_only_when_told() -> None:
    """``pass_acks`` (docs/protocol.md §5.1): absent in an older source's HEADER, so off;
    anything but true or false is refused, naming the field."""
    h = header()
    assert not h.pass_acks and json.loads(h.to_json())["pass_acks"] is False
    asked = dataclasses.replace(h, pass_acks=True)
    assert StreamHeader.from_json(asked.to_json()).pass_acks is True
    doc = json.loads(h.to_json())
    del doc["pass_acks"]
    assert StreamHeader.from_json(json.dumps(doc).encode()).pass_acks is False
    doc["pass_acks"] = "yes"
    with pytest.raises(ValueError, match="pass_acks must be true or false, not 'yes'"):
        StreamHeader.from_json(json.dumps(doc).encode())


def test_header_devices_carry_their_ids() -> None:
    """The id travels as "id" (a device without one has its name as id); the header
    refuses an entry without id, an empty or non-string one, and an id given twice."""
    h = header()
    doc = json.loads(h.to_json())
    assert [(d["name"], d["id"]) for d in doc["devices"]] == [("0000:3b:00.1", "nic0"),
                                                               ("mdev-7", "mdev-7")]
    assert [d.id for d in StreamHeader.from_json(h.to_json()).devices] == ["nic0", "mdev-7"]

    def with_ids(*ids: object) -> bytes:
        d = json.loads(h.to_json())
        for dev, dev_id in zip(d["devices"], ids, strict=True):
            if dev_id is None:
                del dev["id"]
            else:
                dev["id"] = dev_id
        return json.dumps(d).encode()
    for ids, msg in (((None, "mdev-7"), r"devices\[0\]\.id must be a string"),
                     (("nic0", ""), r"devices\[1\]\.id must not be empty"),
                     ((7, "mdev-7"), r"devices\[0\]\.id must be a string"),
                     (("nic0", "nic0"), "device mdev-7: id 'nic0' is repeated")):
        with pytest.raises(ValueError, match=msg):
            StreamHeader.from_json(with_ids(*ids))


def test_writer_refuses_misuse() -> None:
    src = guest_memory(4)
    ram = GuestRam(PS, REGIONS, src)
    w = StreamWriter(MemPipe(), header(), ram)
    with pytest.raises(RuntimeError, match="phase 'new'"):
        w.send_ram([(0, 1)], quiescent=True)
    w.start()
    with pytest.raises(ValueError, match="not in any RAM region"):
        w.send_ram([(64, 1)], quiescent=True)  # the gap after "low"
    with pytest.raises(KeyError, match="not in the stream header"):
        w.send_device_data("nope", b"x")
    w.end_of_state("mdev-7")
    with pytest.raises(RuntimeError, match="phase 'ending'"):
        w.send_ram([(0, 1)], quiescent=True)
    with pytest.raises(RuntimeError, match="data after its END_OF_STATE"):
        w.send_device_data("mdev-7", b"late")
    with pytest.raises(RuntimeError, match="END_OF_STATE sent twice"):
        w.end_of_state("mdev-7")
    with pytest.raises(RuntimeError, match="before END_OF_STATE of 0000:3b:00.1"):
        w.finish()
    with pytest.raises(ValueError, match="layout differs"):
        StreamWriter(MemPipe(), header(), GuestRam(PS, REGIONS[:1], src[:1]))
    with pytest.raises(ValueError, match="memory view has"):
        GuestRam(PS, REGIONS, [bytearray(1)] * 3)
    with pytest.raises(ValueError, match="must be writable"):
        GuestRam(PS, REGIONS[:1], [bytes(64 * PS)], writable=True)


def test_live_and_stop_and_copy_records_are_flagged() -> None:
    from vfiod.migration.stream.records import RAM_LIVE, RECORD_HEADER, RecordType

    pipe = MemPipe()
    w = StreamWriter(pipe, header(), GuestRam(PS, REGIONS, guest_memory(5)))
    w.start()
    w.send_ram([(0, 1)], quiescent=False)
    w.send_ram([(1, 1)], quiescent=True)
    off, flags = 16, []
    while off < len(pipe.data):
        rtype, fl, _, length, *_ = RECORD_HEADER.unpack_from(pipe.data, off)
        if rtype == RecordType.RAM:
            flags.append(fl)
        off += 40 + length
    assert flags == [RAM_LIVE, 0]


class ShortWrites:
    """KernelOps stand-in whose write() takes at most 1000 bytes, as a pipe might."""

    def __init__(self) -> None:
        self.out = bytearray()

    def open(self, path: str, flags: int) -> int:
        return 99

    def write(self, fd: int, data: Any) -> int:
        n = min(len(data), 1000)
        self.out += bytes(data[:n])
        return n

    def close(self, fd: int) -> None:
        pass


def test_file_sink_finishes_short_writes() -> None:
    ops = ShortWrites()
    sink = FileSink(ops, "/nowhere")  # type: ignore[arg-type]
    sink.send_buffers([b"a" * 2500, memoryview(b"b" * 10), np.arange(300, dtype=np.uint32)])
    assert ops.out == b"a" * 2500 + b"b" * 10 + np.arange(300, dtype=np.uint32).tobytes()
    sink.close()
    with pytest.raises(ValueError, match="is closed"):
        sink.send_buffers([b"x"])
