"""``StreamReader``: the destination side of the migration stream (docs/architecture.md §5).

Usage (the destination session drives it; the source is a connection or a file)::

    r = StreamReader(source)
    header = r.read_header()          # preamble + HEADER, validated
    ram = GuestRam(header.page_size, header.regions, my_views, writable=True)
    r.attach_ram(ram, crcs=digests)   # optional: each landed page's CRC goes there too
    for ev in r.events():
        match ev:
            case RamLoaded(): ...                   # pages already in guest memory, CRC ok
            case RamRunsLoaded(): ...               # the same for a RAM_RUNS record's runs
            case DeviceData(device=d, data=b): ...  # write b to the device now (b is reused)
            case EndOfState(device=d): ...
            case IterationMark(number=n): ...
            case Complete(manifest=m): ...          # every tally and digest matched
    r.expect_end()                    # files: nothing may follow the MANIFEST

Guarantees: nothing is allocated from a length before it is checked against ``Limits``; RAM
payload is received with ``recv_into`` straight into the destination's guest memory after
its page range was checked against the layout, and its per-page CRCs are checked right
after the copy, while the pages are still in the CPU cache (and go to ``attach_ram``'s
``crcs``, the content digests: docs/protocol.md §7.3). The destination guest is not running, so a failed check only
means the migration fails and the destination discards — except for ``RAM_LIVE`` records,
whose pages the source's guest may have written during the send: those pages must arrive
verified in a later record before the first END_OF_STATE / the MANIFEST (``torn.py``).
Every fault raises ``RecordError`` with the record index, the byte offset of the record and
an ``ErrorCode``; an ABORT record raises it with ``code=ABORTED``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from vfiod.migration.stream.crc32c import crc32c
from vfiod.migration.stream.events import (
    Complete,
    DeviceData,
    EndOfState,
    Event,
    IterationMark,
    RamLoaded,
    RamRunsLoaded,
)
from vfiod.migration.stream.header import StreamHeader
from vfiod.migration.stream.manifest import Manifest, ManifestEntry, Tally, first_difference
from vfiod.migration.stream.pagecrc import PageCrcSink
from vfiod.migration.stream.ram import GuestRam
from vfiod.migration.stream.ram_landing import RamLanding
from vfiod.migration.stream.records import (
    DEFAULT_LIMITS,
    PREAMBLE_SIZE,
    RECORD_HEADER_SIZE,
    ErrorCode,
    Limits,
    RecordError,
    RecordHeader,
    RecordType,
    check_preamble,
    unpack_header,
)
from vfiod.migration.stream.torn import TornPages


class Source(Protocol):
    def recv_into(self, view: memoryview) -> int:
        """Read at most ``len(view)`` bytes into ``view``; 0 means end of stream."""
        ...


class ChannelBarrier(Protocol):
    """The RAM channels of a multi-connection stream (docs/protocol.md §12;
    ``transport/channel_receive.py``): pass ``number``'s landed records, once every
    channel has completed it, as (first page, count, torn pages)."""

    def barrier(self, number: int) -> list[tuple[int, int, tuple[int, ...]]]: ...

    def entries(self) -> tuple[ManifestEntry, ...]: ...

    def stop(self) -> None: ...

    @property
    def failure(self) -> BaseException | None: ...


def fill_from(source: Source, view: memoryview) -> int:
    """Receive into all of ``view``; returns the bytes received, fewer only when the
    source ended (its ``recv_into`` returned 0) first."""
    got, n = 0, len(view)
    while got < n:
        k = source.recv_into(view[got:])
        if k == 0:
            break
        got += k
    return got


class StreamReader:
    def __init__(self, source: Source, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self._src = source
        self._limits = limits
        self.offset = 0          # bytes consumed so far
        self.records = 0         # records accepted so far (== next sequence number)
        self.header: StreamHeader | None = None
        self._ram: GuestRam | None = None
        self._crcs: PageCrcSink | None = None   # where landed pages' CRCs go
        self._hbuf = memoryview(bytearray(RECORD_HEADER_SIZE))
        self._landing = RamLanding()
        self._buf = bytearray()  # grows to the largest accepted non-RAM payload
        self._dev_tally: list[Tally] = []
        self._ram_tally: list[Tally] = []
        self._dev_chunks: list[int] = []
        self._dev_ended: list[bool] = []
        self._ending = False
        self._torn = TornPages()
        self.torn_records = 0    # LIVE RAM records that failed their check (re-sent later)
        self._iteration = -1
        self._done = False
        self._channels: ChannelBarrier | None = None
        self._final_merged = False

    # -- public API ----------------------------------------------------------------------
    def read_header(self) -> StreamHeader:
        pre = memoryview(bytearray(PREAMBLE_SIZE))
        self._fill(pre, None, 0, "the stream preamble")
        check_preamble(pre)
        self.offset = PREAMBLE_SIZE
        h, at = self._next_header()
        if h.rtype != RecordType.HEADER:
            raise self._err(ErrorCode.ORDER, "the first record must be HEADER", at, h.rtype)
        payload = self._payload(h, at)
        try:
            header = StreamHeader.from_json(payload)
        except ValueError as e:
            raise self._err(ErrorCode.CONTENT, f"bad HEADER: {e}", at, h.rtype) from None
        self._accepted(h)
        self.header = header
        self._dev_tally = [Tally() for _ in header.devices]
        self._ram_tally = [Tally() for _ in header.regions]
        self._dev_chunks = [0] * len(header.devices)
        self._dev_ended = [False] * len(header.devices)
        return header

    def attach_ram(self, ram: GuestRam, *, crcs: PageCrcSink | None = None) -> None:
        """Where RAM records land; must match the header's page size and regions.
        ``crcs`` takes the CRCs of every landed record's pages, as they landed."""
        if self.header is None:
            raise RuntimeError("attach_ram() before read_header()")
        if ram.page_size != self.header.page_size or ram.regions != self.header.regions:
            raise ValueError("destination memory layout differs from the stream header's")
        self._ram = ram
        self._crcs = crcs

    def attach_channels(self, channels: ChannelBarrier) -> None:
        """RAM also arrives on these channels (the HEADER announced them, §12)."""
        self._channels = channels

    def stop_channels(self) -> None:
        """No channel writes guest memory after this returns (a discard, the end)."""
        if self._channels is not None:
            self._channels.stop()

    def events(self) -> Iterator[Event]:
        if self.header is None:
            raise RuntimeError("events() before read_header()")
        if self.header.regions and self._ram is None:
            raise RuntimeError("the stream carries RAM: attach_ram() first")
        try:
            while not self._done:
                h, at = self._next_header()
                if self._channels is not None:
                    yield from self._channel_pass(h)
                yield self._dispatch(h, at)
        except Exception as e:
            failed = self._channels.failure if self._channels is not None else None
            self.stop_channels()
            if failed is not None and failed is not e:
                raise failed from e     # a channel's fault is the cause; the rest follows
            raise
        self.stop_channels()

    def _channel_pass(self, h: RecordHeader) -> Iterator[RamLoaded]:
        """Before ITERATION k: pass k of every channel; before the first END_OF_STATE or
        the MANIFEST: the final pass, numbered one past the last ITERATION (§12.3)."""
        assert self._channels is not None
        if h.rtype == RecordType.ITERATION:
            number = h.arg0
        elif (h.rtype in (RecordType.END_OF_STATE, RecordType.MANIFEST)
              and not self._final_merged):
            self._final_merged = True
            number = self._iteration + 1
        else:
            return
        for first, n, torn in self._channels.barrier(number):
            if self._torn:
                self._torn.clear(first, n)
            for page in torn:      # a page torn on one channel may come on another
                self._torn.add(page, 1, self.records, self.offset)
            self.torn_records += bool(torn)
            yield RamLoaded(first, n, not torn)

    def expect_end(self) -> None:
        """Raise ``RecordError(ORDER)`` if any byte follows the MANIFEST (files)."""
        probe = memoryview(bytearray(1))
        if self._src.recv_into(probe):
            raise self._err(ErrorCode.ORDER, "data after the MANIFEST", self.offset, None)

    # -- records -------------------------------------------------------------------------
    def _dispatch(self, h: RecordHeader, at: int) -> Event:
        assert self.header is not None
        t = h.rtype
        if t == RecordType.ABORT:
            reason = bytes(self._payload(h, at)).decode("utf-8", "replace")
            self._done = True
            raise self._err(ErrorCode.ABORTED, f"the source aborted the migration: {reason}",
                            at, t)
        if t in (RecordType.HEADER, RecordType.CHANNEL, RecordType.SYNC):
            raise self._err(ErrorCode.ORDER, "a second HEADER" if t == RecordType.HEADER
                            else f"{RecordType(t).name} on the main stream", at, t)
        if self._ending and t in (RecordType.RAM, RecordType.RAM_RUNS, RecordType.ITERATION):
            raise self._err(ErrorCode.ORDER, f"{RecordType(t).name} after END_OF_STATE", at, t)
        if t == RecordType.RAM:
            return self._ram_record(h, at)
        if t == RecordType.RAM_RUNS:
            if not self.header.ram_runs:
                raise self._err(ErrorCode.ORDER, "RAM_RUNS, but the HEADER did not offer "
                                "them", at, t)
            return self._ram_runs_record(h, at)
        if t in (RecordType.DEVICE_DATA, RecordType.END_OF_STATE):
            idx = self._device(h, at)
            name = self.header.devices[idx].name
            if self._dev_ended[idx]:
                raise self._err(ErrorCode.ORDER, f"device {name}: "
                                f"{RecordType(t).name} after its END_OF_STATE", at, t)
            if t == RecordType.END_OF_STATE:
                self._no_payload(h, at)
                self._check_torn()
                self._ending = True
                self._dev_ended[idx] = True
                self._accepted(h)
                return EndOfState(name, idx)
            if h.arg1 != self._dev_chunks[idx]:
                raise self._err(ErrorCode.SEQUENCE, f"device {name}: chunk {h.arg1}, expected "
                                f"{self._dev_chunks[idx]}", at, t)
            data = self._payload(h, at)
            self._dev_tally[idx].add(h.seq, h.arg0, h.arg1, h.length, h.payload_crc)
            self._dev_chunks[idx] += 1
            self._accepted(h)
            return DeviceData(name, idx, h.arg1, data)
        if t == RecordType.ITERATION:
            self._no_payload(h, at)
            if h.arg0 <= self._iteration:
                raise self._err(ErrorCode.ORDER, f"iteration {h.arg0} after {self._iteration}",
                                at, t)
            self._iteration = h.arg0
            self._accepted(h)
            return IterationMark(h.arg0)
        assert t == RecordType.MANIFEST
        return self._manifest(h, at)

    def _ram_record(self, h: RecordHeader, at: int) -> RamLoaded:
        assert self._ram is not None and self.header is not None
        ps, n, first = self.header.page_size, h.arg1, h.arg0
        idx, bad = self._landing.land(
            self._ram, first, n, h.length, h.payload_crc, h.flags,
            fill=lambda view, what: self._fill(view, h.rtype, at, what),
            fail=lambda code, msg: self._err(code, msg, at, h.rtype), crcs=self._crcs)
        if self._torn:
            self._torn.clear(first, n)
        if bad.size:
            # Sent from running guest memory: these pages must come again, verified.
            for i in bad.tolist():
                self._torn.add(first + i, 1, self.records, at)
            self.torn_records += 1
        self.offset += h.length
        self._ram_tally[idx].add(h.seq, first, n, n * ps, h.payload_crc)
        self._accepted(h)
        return RamLoaded(first, n, not bad.size)

    def _ram_runs_record(self, h: RecordHeader, at: int) -> RamRunsLoaded:
        """A RAM_RUNS record (docs/protocol.md §5.4): one event for all of its runs."""
        assert self._ram is not None and self.header is not None
        k, n = h.arg0, h.arg1
        idx, runs = self._landing.land_runs(
            self._ram, k, n, h.length, h.payload_crc, h.flags, self._limits.ram_runs,
            fill=lambda view, what: self._fill(view, h.rtype, at, what),
            fail=lambda code, msg: self._err(code, msg, at, h.rtype), crcs=self._crcs)
        torn_pages: list[int] = []
        for first, count, torn in runs:
            if self._torn:
                self._torn.clear(first, count)
            torn_pages += torn
        for page in torn_pages:      # sent from running guest memory: must come again
            self._torn.add(page, 1, self.records, at)
        self.torn_records += bool(torn_pages)
        self.offset += h.length
        self._ram_tally[idx].add(h.seq, k, n, n * self.header.page_size, h.payload_crc)
        self._accepted(h)
        return RamRunsLoaded(tuple((f, c) for f, c, _ in runs), tuple(torn_pages))

    def _check_torn(self) -> None:
        """RAM is complete: no page may still be waiting for a verified copy."""
        if self._torn:
            first, end, record, offset = self._torn.first()
            raise RecordError(ErrorCode.PAYLOAD_CHECKSUM,
                              f"{self._torn.pages} guest page(s) failed their checksum and were "
                              f"never sent again, first pages {first:#x}..{end - 1:#x}",
                              record=record, offset=offset, rtype=RecordType.RAM)

    def _manifest(self, h: RecordHeader, at: int) -> Complete:
        assert self.header is not None
        self._check_torn()
        missing = [d.name for d, e in zip(self.header.devices, self._dev_ended, strict=True)
                   if not e]
        if missing:
            raise self._err(ErrorCode.ORDER, "MANIFEST before END_OF_STATE of "
                            + ", ".join(missing), at, h.rtype)
        payload = self._payload(h, at)
        try:
            sent = Manifest.from_json(payload)
        except ValueError as e:
            raise self._err(ErrorCode.CONTENT, f"bad MANIFEST: {e}", at, h.rtype) from None
        got = Manifest(
            ram=tuple(t.entry(r.name) for t, r in zip(self._ram_tally, self.header.regions,
                                                       strict=True)),
            devices=tuple(t.entry(d.name) for t, d in zip(self._dev_tally, self.header.devices,
                                                           strict=True)),
            records=self.records,
            channels=self._channels.entries() if self._channels is not None else ())
        diff = first_difference(sent, got)
        if diff is not None:
            region, what = diff
            raise RecordError(ErrorCode.MANIFEST, f"manifest mismatch: {what}",
                              record=self.records, offset=at, rtype=h.rtype, region=region)
        self._accepted(h)
        self._done = True
        return Complete(sent)

    # -- plumbing ------------------------------------------------------------------------
    def _next_header(self) -> tuple[RecordHeader, int]:
        at = self.offset
        got = self._fill(self._hbuf, None, at, "a record header", eof_ok=True)
        if got == 0:
            raise self._err(ErrorCode.TRUNCATED, f"the stream ended after {self.records} "
                            "records, before its MANIFEST", at, None)
        h = unpack_header(self._hbuf, seq=self.records, offset=at, limits=self._limits)
        self.offset += RECORD_HEADER_SIZE
        return h, at

    def _payload(self, h: RecordHeader, at: int) -> memoryview:
        """Read a bounded non-RAM payload into the reused buffer and check its CRC."""
        if len(self._buf) < h.length:  # h.length was checked against the type's bound
            self._buf = bytearray(h.length)
        view = memoryview(self._buf)[:h.length]
        self._fill(view, h.rtype, at, "payload")
        self.offset += h.length
        if (crc32c(view) if h.length else 0) != h.payload_crc:
            raise self._err(ErrorCode.PAYLOAD_CHECKSUM, "payload checksum mismatch", at,
                            h.rtype)
        return view

    def _no_payload(self, h: RecordHeader, at: int) -> None:
        if h.length:  # bounds for these types are 0, so this is unreachable unless changed
            raise self._err(ErrorCode.LENGTH, "this record type has no payload", at, h.rtype)

    def _device(self, h: RecordHeader, at: int) -> int:
        assert self.header is not None
        if h.arg0 >= len(self.header.devices):
            raise self._err(ErrorCode.RANGE, f"device index {h.arg0}, the header lists "
                            f"{len(self.header.devices)}", at, h.rtype)
        return h.arg0

    def _accepted(self, h: RecordHeader) -> None:
        self.records += 1

    def _fill(self, view: memoryview, rtype: int | None, at: int, what: str,
              eof_ok: bool = False) -> int:
        got = fill_from(self._src, view)
        if got < len(view) and not (eof_ok and got == 0):
            raise self._err(ErrorCode.TRUNCATED, f"the stream ended {got} bytes into "
                            f"{what} of {len(view)} bytes", at, rtype)
        return got

    def _err(self, code: ErrorCode, msg: str, at: int, rtype: int | None) -> RecordError:
        record = self.records if self.offset >= PREAMBLE_SIZE else None
        return RecordError(code, msg, record=record, offset=at, rtype=rtype)
