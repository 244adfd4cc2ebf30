"""Every fault in a stream is caught and located (record index, byte offset, ErrorCode)."""

from __future__ import annotations

import struct
import tracemalloc

import pytest

from tests.support.mem_pipe import MemPipe
from vfiod.migration.stream import (
    DeviceInfo,
    ErrorCode,
    GuestRam,
    Limits,
    RecordError,
    RecordType,
    StreamHeader,
    StreamReader,
    StreamWriter,
)
from vfiod.migration.stream.crc32c import crc32c
from vfiod.migration.stream.manifest import Manifest, ManifestEntry
from vfiod.migration.stream.pagecrc import page_crcs
from vfiod.migration.stream.records import (
    PREAMBLE_SIZE,
    PROTOCOL_VERSION,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    pack_header,
    pack_preamble,
)
from vfiod.vfio import RamRegion

PS = 4096
REGIONS = (RamRegion("low", 0, 8 * PS), RamRegion("high", 0x10000, 4 * PS))
DEVICES = (DeviceInfo("dev-a", "v2", 1), DeviceInfo("dev-b", "v1", 0))
HEADER = StreamHeader("src", "m", "g", PS, REGIONS, DEVICES)


def valid_stream() -> bytes:
    mem = [bytearray((i * 7 + j) % 251 for j in range(r.size)) for i, r in enumerate(REGIONS)]
    p = MemPipe()
    w = StreamWriter(p, HEADER, GuestRam(PS, REGIONS, mem), record_bytes=2 * PS)
    w.start()
    w.send_ram([(0, 8)], quiescent=False)
    w.send_device_data("dev-a", b"A" * 100)
    w.mark_iteration(1)
    w.send_ram([(0x10, 4)], quiescent=True)
    w.send_device_data("dev-b", b"B" * 50)
    w.end_of_state("dev-a")
    w.send_device_data("dev-b", b"b" * 5)
    w.end_of_state("dev-b")
    w.finish()
    return bytes(p.data)


STREAM = valid_stream()


def records(stream: bytes) -> list[tuple[int, int, int]]:
    """(offset, type, payload length) of every record."""
    out, off = [], PREAMBLE_SIZE
    while off < len(stream):
        rtype, _, _, length, *_ = RECORD_HEADER.unpack_from(stream, off)
        out.append((off, rtype, length))
        off += RECORD_HEADER_SIZE + length
    return out


RECORDS = records(STREAM)


def parse(stream: bytes, limits: Limits | None = None) -> StreamReader:
    r = StreamReader(MemPipe(stream), **({"limits": limits} if limits else {}))
    h = r.read_header()
    r.attach_ram(GuestRam(PS, h.regions, [bytearray(x.size) for x in h.regions],
                          writable=True))
    for _ in r.events():
        pass
    r.expect_end()
    return r


def fails(stream: bytes, code: ErrorCode, limits: Limits | None = None) -> RecordError:
    with pytest.raises(RecordError) as ei:
        parse(stream, limits)
    assert ei.value.code == code, str(ei.value)
    return ei.value


class Forge:
    """Build records with correct sequence numbers and checksums, in any order."""

    def __init__(self, header: StreamHeader = HEADER) -> None:
        self.out = bytearray(pack_preamble())
        self.seq = 0
        self.offsets: list[int] = []
        self.add(RecordType.HEADER, header.to_json())

    def add(self, rtype: int, payload: bytes = b"", arg0: int = 0, arg1: int = 0,
            length: int | None = None) -> Forge:
        self.offsets.append(len(self.out))
        n = len(payload) if length is None else length
        self.out += pack_header(rtype, self.seq, n, arg0, arg1,
                                crc32c(payload) if payload else 0) + payload
        self.seq += 1
        return self

    def ram(self, first: int, count: int, flags: int = 0, bad_page: int | None = None) -> Forge:
        """A RAM record of zero pages: CRC table, then the pages (one entry may lie)."""
        pages = bytes(PS * count)
        table = page_crcs(pages, PS)
        if bad_page is not None:
            table[bad_page] ^= 1
        payload = table.tobytes() + pages
        self.offsets.append(len(self.out))
        self.out += pack_header(RecordType.RAM, self.seq, len(payload), first, count,
                                crc32c(table.tobytes()), flags) + payload
        self.seq += 1
        return self

    def ends(self) -> Forge:
        return self.add(RecordType.END_OF_STATE, arg0=0).add(RecordType.END_OF_STATE, arg0=1)


def test_the_valid_stream_parses() -> None:
    r = parse(STREAM)
    assert r.records == len(RECORDS)
    assert [t for _, t, _ in RECORDS][0] == RecordType.HEADER
    assert [t for _, t, _ in RECORDS][-1] == RecordType.MANIFEST


def test_every_byte_flip_in_every_record_header_is_detected_and_located() -> None:
    for index, (off, _, _) in enumerate(RECORDS):
        for i in range(RECORD_HEADER_SIZE):
            bad = bytearray(STREAM)
            bad[off + i] ^= 0xFF
            err = fails(bytes(bad), ErrorCode.HEADER_CHECKSUM)
            assert (err.record, err.offset) == (index, off), (index, i, str(err))
            assert f"record {index}" in str(err) and f"byte offset {off}" in str(err)


def test_every_byte_flip_in_the_preamble_is_detected() -> None:
    for i in range(PREAMBLE_SIZE):
        bad = bytearray(STREAM)
        bad[i] ^= 0xFF
        with pytest.raises(RecordError) as ei:
            parse(bytes(bad))
        assert ei.value.code in (ErrorCode.MAGIC, ErrorCode.HEADER_CHECKSUM)
        assert ei.value.record is None and "stream preamble" in str(ei.value)


def test_payload_flips_are_detected_in_every_record_with_a_payload() -> None:
    for index, (off, rtype, length) in enumerate(RECORDS):
        if not length:
            continue
        start = off + RECORD_HEADER_SIZE
        for pos in sorted({start, start + length // 2, start + length - 1}):
            bad = bytearray(STREAM)
            bad[pos] ^= 0x01
            err = fails(bytes(bad), ErrorCode.PAYLOAD_CHECKSUM)
            assert (err.record, err.offset, err.rtype) == (index, off, rtype)


def test_truncation_anywhere_is_reported_with_the_record() -> None:
    cuts = {0, 5, PREAMBLE_SIZE}
    for off, _, length in RECORDS:
        cuts |= {off, off + 1, off + RECORD_HEADER_SIZE, off + RECORD_HEADER_SIZE + length // 2}
    for cut in sorted(c for c in cuts if c < len(STREAM)):
        err = fails(STREAM[:cut], ErrorCode.TRUNCATED)
        if cut >= PREAMBLE_SIZE:
            index = max(i for i, (o, _, _) in enumerate(RECORDS) if o <= cut)
            assert err.record == index, (cut, str(err))
    # and a stream that stops cleanly between two records, before its MANIFEST
    err = fails(STREAM[:RECORDS[-1][0]], ErrorCode.TRUNCATED)
    assert "before its MANIFEST" in str(err)


def test_unknown_record_type() -> None:
    f = Forge().add(99, b"?")
    err = fails(bytes(f.out), ErrorCode.TYPE)
    assert (err.record, err.offset) == (1, f.offsets[1])
    assert "unknown record type 99" in str(err)


def test_reserved_flags_are_refused() -> None:
    f = Forge()
    head = struct.pack("<HHIQQQI", RecordType.ITERATION, 1, 1, 0, 0, 0, 0)
    f.out += head + struct.pack("<I", crc32c(head))
    assert fails(bytes(f.out), ErrorCode.FLAGS).record == 1


def test_lengths_over_the_bound_are_refused_before_reading_or_allocating() -> None:
    limits = Limits(device_chunk=1024)
    f = Forge().add(RecordType.DEVICE_DATA, b"x" * 1025, arg0=0)
    err = fails(bytes(f.out), ErrorCode.LENGTH, limits)
    assert "over the bound 1024" in str(err)
    # A header that claims a huge payload: nothing near that size is ever allocated.
    for rtype, arg1 in ((RecordType.DEVICE_DATA, 0), (RecordType.MANIFEST, 0),
                        (RecordType.RAM, 1 << 28)):
        f = Forge().add(rtype, arg0=0, arg1=arg1, length=1 << 40)
        tracemalloc.start()
        try:
            fails(bytes(f.out), ErrorCode.LENGTH)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, f"{rtype.name}: {peak} bytes allocated"


def test_ram_length_must_match_the_page_count() -> None:
    f = Forge().add(RecordType.RAM, b"\0" * PS, arg0=0, arg1=2)
    assert "is not 2 pages" in str(fails(bytes(f.out), ErrorCode.LENGTH))


def test_a_bad_page_in_a_stop_and_copy_record_is_fatal_and_named() -> None:
    f = Forge().ram(2, 4, bad_page=3)
    err = fails(bytes(f.out), ErrorCode.PAYLOAD_CHECKSUM)
    assert (err.record, err.offset) == (1, f.offsets[1])
    assert "guest page 0x5 (page 3 of 4 in this record)" in str(err)


def test_ram_outside_the_layout_is_refused() -> None:
    for first, count in ((8, 1), (7, 2), (0x14, 1), (0x0F, 1)):
        f = Forge().ram(first, count)
        err = fails(bytes(f.out), ErrorCode.RANGE)
        assert "not inside one RAM region" in str(err)


def test_ram_after_end_of_state_is_out_of_order() -> None:
    f = Forge().add(RecordType.END_OF_STATE, arg0=0).ram(0, 1)
    err = fails(bytes(f.out), ErrorCode.ORDER)
    assert "RAM after END_OF_STATE" in str(err) and err.record == 2


def test_other_order_violations() -> None:
    cases = [
        (Forge().add(RecordType.HEADER, HEADER.to_json()), "a second HEADER"),
        (Forge().add(RecordType.END_OF_STATE, arg0=0)
         .add(RecordType.DEVICE_DATA, b"x", arg0=0), "after its END_OF_STATE"),
        (Forge().add(RecordType.END_OF_STATE, arg0=1).add(RecordType.END_OF_STATE, arg0=1),
         "after its END_OF_STATE"),
        (Forge().add(RecordType.END_OF_STATE, arg0=0).add(RecordType.MANIFEST, b"{}"),
         "MANIFEST before END_OF_STATE of dev-b"),
        (Forge().add(RecordType.ITERATION, arg0=2).add(RecordType.ITERATION, arg0=2),
         "iteration 2 after 2"),
        (Forge().ends().add(RecordType.ITERATION, arg0=1), "ITERATION after END_OF_STATE"),
    ]
    for forge, msg in cases:
        assert msg in str(fails(bytes(forge.out), ErrorCode.ORDER))
    # the first record must be the HEADER
    out = bytearray(pack_preamble()) + pack_header(RecordType.ITERATION, 0, 0)
    assert "first record must be HEADER" in str(fails(bytes(out), ErrorCode.ORDER))
    # nothing may follow the MANIFEST
    err = fails(STREAM + b"\0", ErrorCode.ORDER)
    assert "data after the MANIFEST" in str(err)


def test_a_lost_record_breaks_the_sequence() -> None:
    off, _, length = RECORDS[3]
    bad = STREAM[:off] + STREAM[off + RECORD_HEADER_SIZE + length:]
    err = fails(bad, ErrorCode.SEQUENCE)
    assert (err.record, err.offset) == (3, off)
    assert "expected 3" in str(err)


def test_device_chunks_must_come_in_order_and_exist() -> None:
    f = Forge().add(RecordType.DEVICE_DATA, b"x", arg0=0, arg1=1)
    assert "chunk 1, expected 0" in str(fails(bytes(f.out), ErrorCode.SEQUENCE))
    f = Forge().add(RecordType.DEVICE_DATA, b"x", arg0=5)
    assert "device index 5" in str(fails(bytes(f.out), ErrorCode.RANGE))


def _manifest_for(stream: bytes) -> Manifest:
    off, _, length = records(stream)[-1]
    return Manifest.from_json(stream[off + RECORD_HEADER_SIZE:off + RECORD_HEADER_SIZE + length])


def _with_manifest(m: Manifest) -> bytes:
    off, _, _ = RECORDS[-1]
    payload = m.to_json()
    return STREAM[:off] + pack_header(RecordType.MANIFEST, len(RECORDS) - 1, len(payload), 0, 0,
                                      crc32c(payload)) + payload


def test_manifest_digest_mismatch_names_the_region() -> None:
    m = _manifest_for(STREAM)
    high = m.ram[1]
    tampered = Manifest((m.ram[0], ManifestEntry(high.name, high.records, high.bytes,
                                                 "00" * 16)), m.devices, m.records)
    err = fails(_with_manifest(tampered), ErrorCode.MANIFEST)
    assert err.region == "high" and "digest" in str(err)
    dev = m.devices[1]
    tampered = Manifest(m.ram, (m.devices[0], ManifestEntry(dev.name, dev.records,
                                                            dev.bytes + 1, dev.digest)),
                        m.records)
    err = fails(_with_manifest(tampered), ErrorCode.MANIFEST)
    assert err.region == "dev-b" and "55 bytes" in str(err)
    tampered = Manifest(m.ram, m.devices, m.records + 1)
    assert fails(_with_manifest(tampered), ErrorCode.MANIFEST).region == "stream"


def test_bad_json_payloads() -> None:
    f = Forge().ends().add(RecordType.MANIFEST, b"[1, 2]")
    assert "bad MANIFEST" in str(fails(bytes(f.out), ErrorCode.CONTENT))
    out = bytearray(pack_preamble())
    payload = b'{"protocol": 1}'
    out += pack_header(RecordType.HEADER, 0, len(payload), 0, 0, crc32c(payload)) + payload
    assert "bad HEADER" in str(fails(bytes(out), ErrorCode.CONTENT))


def test_abort_is_reported_with_its_reason() -> None:
    p = MemPipe()
    w = StreamWriter(p, HEADER, GuestRam(PS, REGIONS, [bytearray(r.size) for r in REGIONS]))
    w.start()
    w.send_ram([(0, 2)], quiescent=True)
    w.abort("operator cancelled")
    err = fails(bytes(p.data), ErrorCode.ABORTED)
    assert "operator cancelled" in str(err) and err.record == 2


@pytest.mark.parametrize("version,age", [(1, "an older"), (2, "an older"), (3, "an older"),
                                         (5, "a newer")])
def test_another_protocol_version_is_refused(version: int, age: str) -> None:
    """Version 1 sent the content digests as an ACK, version 2 had no REPORT frame,
    version 3 resumed without a COMMIT: their streams are refused by number."""
    head = struct.pack("<8sHH", b"VFIODMS\0", version, 0)
    bad = head + struct.pack("<I", crc32c(head)) + STREAM[PREAMBLE_SIZE:]
    err = fails(bad, ErrorCode.VERSION)
    assert f"stream protocol version {version} ({age} vfiod), this vfiod speaks 4 only" in \
        str(err)
    assert PROTOCOL_VERSION == 4


def test_wrong_magic() -> None:
    assert "not a vfiod migration stream" in str(fails(b"GET / HTTP/1.1\r\n" + STREAM,
                                                      ErrorCode.MAGIC))
