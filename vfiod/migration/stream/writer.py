"""``StreamWriter``: the source side of the migration stream (docs/architecture.md §5).

Usage (the session drives it; the sink is a transport connection or a file)::

    w = StreamWriter(sink, header, ram)          # ram: GuestRam over the source's mmaps
    w.start()                                    # preamble + HEADER
    w.send_ram(ranges, quiescent=False)          # pre-copy pass: (first page, count) runs
    w.send_device_data("0000:3b:00.1", chunk)    # device pre-copy / stop-copy bytes, in order
    w.mark_iteration(1)
    ...                                          # stop-and-copy
    w.send_ram(final_ranges, quiescent=True)
    w.end_of_state("0000:3b:00.1")               # once per device, after all its data;
                                                 # no RAM after the first END_OF_STATE
    manifest = w.finish()                        # MANIFEST; then wait for the peer's ack
    # on cancel: w.abort("operator cancelled")

RAM leaves in large batches: every record is a 40-byte header, its per-page CRC table (a
small numpy array) and a memoryview of up to ``record_bytes`` of guest memory, and one
``sink.send_buffers`` call (``socket.sendmsg`` for TCP) carries up to ``batch_bytes``.
There are a few Python objects per run of pages, none per page. Short runs share RAM_RUNS
records (``ram_framing``, docs/protocol.md §5.4).

``quiescent`` says whether guest memory can change while it is being sent. Either way the
bytes go to the socket straight from the guest mapping (no copy in user space):

* ``quiescent=True`` (stop-and-copy: the guest and its devices are stopped): the CRC is
  computed over guest memory that cannot change, and a mismatch at the destination is
  fatal. Those CRCs are also the pages' content digests: with ``attach_crc_sink`` each
  record's table goes to the sink (the session's ``RamDigests``), which then need not
  read the pages again (docs/protocol.md §7.3).
* ``quiescent=False`` (pre-copy: the guest runs and writes its RAM): the records carry the
  ``RAM_LIVE`` flag. A page the guest writes between the checksum and the kernel's copy
  fails the destination's check; that page is dirty again, so a later pass re-sends it, and
  the destination only requires every such page to arrive verified before RAM is complete
  (``torn.py``). Copying each batch to a private buffer first would make the check exact but
  costs a third pass over the data; this keeps the stream at socket speed.

Every public call ends with the batch sent (so the caller may reuse its buffers) and with
``sink.check_peer()``, which raises if the destination cancelled or failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from vfiod.migration.stream.crc32c import crc32c
from vfiod.migration.stream.header import StreamHeader
from vfiod.migration.stream.manifest import Manifest, ManifestEntry, Tally
from vfiod.migration.stream.pagecrc import PageCrcSink
from vfiod.migration.stream.ram import GuestRam
from vfiod.migration.stream.ram_framing import (
    BATCH_PIECES,
    GROUP_BELOW_PAGES,
    MAX_IOV,
    TAIL_PAGES,
    groups,
    piece_tables,
    ram_record,
    ram_runs_record,
    tapered,
)
from vfiod.migration.stream.records import (
    DEFAULT_LIMITS,
    RAM_LIVE,
    RECORD_HEADER_SIZE,
    Limits,
    MiB,
    RecordType,
    pack_header,
    pack_preamble,
)

_Rec = tuple[int, int, int, memoryview]  # region index, first page, count, guest memory


class StreamSink(Protocol):
    """Where a stream goes (``vfiod.migration.transport`` implements it)."""

    def send_buffers(self, buffers: Sequence[Any]) -> None:
        """Send every byte of every buffer, in order, or raise."""
        ...

    def check_peer(self) -> None:
        """Raise if the receiver has cancelled or reported an error (files: no-op)."""
        ...


class RamChannels(Protocol):
    """RAM channels of a multi-connection stream (docs/protocol.md §12;
    ``transport/channel_send.py``)."""

    def submit(self, batch: list[_Rec], flags: int, crcs: PageCrcSink | None) -> None: ...

    def sync(self, number: int) -> None: ...

    def drain(self) -> int: ...

    def entries(self) -> tuple[ManifestEntry, ...]: ...

    def close(self, *, abort: bool = False) -> None: ...


class StreamWriter:
    def __init__(self, sink: StreamSink, header: StreamHeader, ram: GuestRam | None = None, *,
                 limits: Limits = DEFAULT_LIMITS, record_bytes: int = 4 * MiB,
                 batch_bytes: int = 16 * MiB,
                 group_below_pages: int = GROUP_BELOW_PAGES) -> None:
        """``group_below_pages``: shorter pieces share RAM_RUNS records (``ram_framing``;
        0: every piece in a RAM record of its own, as a HEADER without ``ram_runs``
        requires)."""
        if ram is not None and (ram.page_size != header.page_size
                                or ram.regions != header.regions):
            raise ValueError("GuestRam layout differs from the stream header's layout")
        if header.regions and ram is None:
            raise ValueError("the header lists RAM regions: a GuestRam is required")
        if not header.page_size <= record_bytes <= min(limits.ram_record, batch_bytes):
            raise ValueError(f"record_bytes {record_bytes} must be between the page size and "
                             f"min(ram_record limit, batch_bytes)")
        self._sink = sink
        self.header = header
        self._ram = ram
        self._limits = limits
        self._record_pages = record_bytes // header.page_size
        self._batch_bytes = batch_bytes
        self._group_below = group_below_pages if header.ram_runs else 0
        self._iov: list[Any] = []
        self._pending = 0
        self._seq = 0
        self._ram_tally = [Tally() for _ in header.regions]
        self._dev_tally = [Tally() for _ in header.devices]
        self._dev_chunks = [0] * len(header.devices)
        self._dev_ended = [False] * len(header.devices)
        self._phase = "new"  # new -> data -> ending -> done | aborted
        self._iteration = -1
        self._channels: RamChannels | None = None
        self._crc_sink: PageCrcSink | None = None
        self.bytes_sent = 0
        self.ram_bytes_sent = 0
        self.device_bytes_sent = 0

    # -- public API ----------------------------------------------------------------------
    @property
    def records_sent(self) -> int:
        return self._seq

    def start(self) -> None:
        self._expect("new", "start")
        payload = self.header.to_json()
        if len(payload) > self._limits.header:
            raise ValueError(f"header is {len(payload)} bytes, over the {self._limits.header} "
                             "bound")
        self._iov.append(pack_preamble())
        self._pending += 16
        self._emit(RecordType.HEADER, payload, 0, 0, None)
        self._phase = "data"
        self._flush()

    def attach_channels(self, channels: RamChannels) -> None:
        """From now on RAM records travel on these channels (after ``start``: the HEADER
        announced them)."""
        self._expect("data", "attach_channels")
        self._channels = channels

    def attach_crc_sink(self, sink: PageCrcSink) -> None:
        """Hand the per-page CRC table of every quiescent RAM record to ``sink``."""
        self._crc_sink = sink

    def send_ram(self, ranges: Iterable[tuple[int, int]] | np.ndarray, *,
                 quiescent: bool, last: bool = False) -> int:
        """Send guest pages given as (first page, count) runs; returns payload bytes sent.
        ``last``: these are a pass's last pages: its last record is at most
        ``TAIL_PAGES`` (``ram_framing.tapered``), so that the destination's check of it,
        which starts only once its last byte arrived, is short."""
        self._expect("data", "send_ram")
        assert self._ram is not None
        if isinstance(ranges, np.ndarray):
            ranges = ranges.tolist()  # plain ints, one tuple per run (not per page)
        if last:
            ranges = tapered(list(ranges))
        flags = 0 if quiescent else RAM_LIVE
        # live pages may change after their CRC: only a quiescent send's CRCs are digests
        sink = self._crc_sink if quiescent else None
        sent = 0
        if self._channels is not None:
            return self._send_ram_channels(ranges, flags, sink)
        batches = self._ram_batches(ranges)
        batch = next(batches, None)
        while batch is not None:
            following = next(batches, None)      # None: this batch ends the call
            # Checksum a batch just before handing it to the kernel, so that the kernel's
            # copy finds it in the cache. (Checksumming on a worker thread one batch ahead
            # was measured no faster on two cores: GIL hand-offs eat the overlap.)
            tables, starts = piece_tables(self._ram, batch)
            sent += self._send_ram_batch(batch, tables, starts, flags,
                                         last and following is None)
            if sink is not None:
                sink.take_runs_crcs([p[1] for p in batch], [p[2] for p in batch], tables)
            batch = following
        self.ram_bytes_sent += sent
        self._flush()
        return sent

    def send_device_data(self, device: str, data: bytes | bytearray | memoryview) -> None:
        """Append opaque device state, cut into chunks of at most ``limits.device_chunk``.

        Allowed until that device's END_OF_STATE (also after other devices have ended)."""
        if self._phase != "ending":
            self._expect("data", "send_device_data")
        idx = self.header.device_index(device)
        if self._dev_ended[idx]:
            raise RuntimeError(f"device {device}: data after its END_OF_STATE")
        mv = memoryview(data).cast("B")
        step = self._limits.device_chunk
        for off in range(0, len(mv), step):
            self._emit(RecordType.DEVICE_DATA, mv[off:off + step], idx, self._dev_chunks[idx],
                       self._dev_tally[idx])
            self._dev_chunks[idx] += 1
        self.device_bytes_sent += len(mv)
        self._flush()

    def mark_iteration(self, number: int) -> None:
        self._expect("data", "mark_iteration")
        if number <= self._iteration:
            raise ValueError(f"iteration {number} after {self._iteration}: must increase")
        self._iteration = number
        self._sync_channels(number)
        self._emit(RecordType.ITERATION, b"", number, 0, None)
        self._flush()

    def end_of_state(self, device: str) -> None:
        if self._phase == "data":
            self._sync_channels(self._iteration + 1)    # the final pass (§12.3)
            self._phase = "ending"
        self._expect("ending", "end_of_state")
        idx = self.header.device_index(device)
        if self._dev_ended[idx]:
            raise RuntimeError(f"device {device}: END_OF_STATE sent twice")
        self._dev_ended[idx] = True
        self._emit(RecordType.END_OF_STATE, b"", idx, 0, None)
        self._flush()

    def finish(self) -> Manifest:
        if self._phase == "data":
            self._sync_channels(self._iteration + 1)
            self._phase = "ending"
        self._expect("ending", "finish")
        missing = [d.name for d, e in zip(self.header.devices, self._dev_ended, strict=True)
                   if not e]
        if missing:
            raise RuntimeError(f"finish before END_OF_STATE of {', '.join(missing)}")
        manifest = Manifest(
            ram=tuple(t.entry(r.name) for t, r in zip(self._ram_tally, self.header.regions,
                                                       strict=True)),
            devices=tuple(t.entry(d.name) for t, d in zip(self._dev_tally, self.header.devices,
                                                           strict=True)),
            records=self._seq,
            channels=self._channels.entries() if self._channels is not None else ())
        self._emit(RecordType.MANIFEST, manifest.to_json(), 0, 0, None)
        self._phase = "done"
        self._flush()
        if self._channels is not None:
            self._channels.close()
        return manifest

    @property
    def finished(self) -> bool:
        """The MANIFEST went out: the stream has ended."""
        return self._phase == "done"

    def abort(self, reason: str) -> None:
        """Tell the destination to discard everything (the source rolls back itself)."""
        if self._phase in ("done", "aborted"):
            return
        self._iov.clear()  # a half-built batch is not sent: ABORT follows complete records
        self._pending = 0
        data = reason.encode("utf-8", "replace")[: self._limits.abort]
        self._phase = "aborted"
        if self._channels is not None:
            self._channels.close(abort=True)
        self._emit(RecordType.ABORT, data, 0, 0, None)
        self._flush(check=False)

    # -- internals -----------------------------------------------------------------------
    def _expect(self, phase: str, what: str) -> None:
        if self._phase != phase:
            raise RuntimeError(f"StreamWriter.{what}() in phase {self._phase!r} (needs "
                               f"{phase!r})")

    def _emit(self, rtype: RecordType, payload: Any, arg0: int, arg1: int,
              tally: Tally | None, flags: int = 0) -> None:
        n = len(payload)
        crc = crc32c(payload) if n else 0
        self._iov.append(pack_header(rtype, self._seq & 0xFFFFFFFF, n, arg0, arg1, crc,
                                     flags))
        if n:
            self._iov.append(payload)
        if tally is not None:
            tally.add(self._seq, arg0, arg1, n, crc)
        self._seq += 1
        self._pending += RECORD_HEADER_SIZE + n
        if self._pending >= self._batch_bytes or len(self._iov) >= MAX_IOV:
            self._flush(check=False)

    def _ram_batches(self, ranges: Iterable[tuple[int, int]]) -> Iterator[list[_Rec]]:
        """Records (region, first page, count, view) grouped into send batches."""
        assert self._ram is not None
        batch: list[_Rec] = []
        size = 0
        for first, count in ranges:
            if count <= 0:
                continue
            for idx, page, n in self._ram.split(int(first), int(count), self._record_pages):
                view = self._ram.locate(page, n)[1]
                if batch and (size + len(view) > self._batch_bytes
                              or len(batch) >= BATCH_PIECES):
                    yield batch
                    batch, size = [], 0
                batch.append((idx, page, n, view))
                size += len(view)
        if batch:
            yield batch

    def _send_ram_batch(self, batch: list[_Rec], tables: np.ndarray, starts: list[int],
                        flags: int, tail: bool = False) -> int:
        """A record per long piece, a RAM_RUNS record per group of short ones
        (``ram_framing``)."""
        ps = self.header.page_size
        for group in groups(batch, self._record_pages, self._limits.ram_runs,
                            self._group_below, TAIL_PAGES if tail else 0):
            idx, page, _, _ = batch[group[0]]
            table = tables[starts[group[0]]:starts[group[-1] + 1]]   # a group is consecutive
            if len(group) == 1:
                iov, length, crc = ram_record(batch[group[0]], table, self._seq, flags)
                arg0 = page
            else:
                iov, length, crc = ram_runs_record([batch[i] for i in group], table,
                                                   self._seq, flags)
                arg0 = len(group)
            pages = len(table)
            self._iov += iov
            self._ram_tally[idx].add(self._seq, arg0, pages, pages * ps, crc)  # page bytes
            self._seq += 1
            self._pending += RECORD_HEADER_SIZE + length
        self._flush()
        return sum(len(view) for _, _, _, view in batch)

    def _send_ram_channels(self, ranges: Iterable[tuple[int, int]], flags: int,
                           sink: PageCrcSink | None) -> int:
        assert self._channels is not None
        sent = 0
        try:
            for batch in self._ram_batches(ranges):
                self._channels.submit(batch, flags, sink)
                sent += sum(len(view) for _, _, _, view in batch)
            self.bytes_sent += self._channels.drain()
        except Exception:
            self._sink.check_peer()     # the destination's own ERROR says more, if any
            raise
        self.ram_bytes_sent += sent
        self._sink.check_peer()
        return sent

    def _sync_channels(self, number: int) -> None:
        if self._channels is not None:
            try:
                self._channels.sync(number)
            except Exception:
                self._sink.check_peer()
                raise
            self.bytes_sent += self._channels.drain()

    def _flush(self, check: bool = True) -> None:
        if self._iov:
            iov, pending = self._iov, self._pending
            self._iov, self._pending = [], 0
            self._sink.send_buffers(iov)
            self.bytes_sent += pending
        if check:
            self._sink.check_peer()
