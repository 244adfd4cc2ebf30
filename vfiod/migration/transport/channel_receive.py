"""The destination's RAM channels: each lands its RAM records in guest memory on its own
thread, and none runs ahead of a pass the others have not finished (docs/protocol.md §12).

``ChannelReader`` reads one channel after its CHANNEL record (``stream/channel_hello.py``):
RAM records are checked like the main stream's (header checksum, type, flags, sequence,
length, the range against the layout, the CRC table, then ``recv_into`` guest memory and
the per-page CRCs while the pages are in cache, which then go to the ``PageCrcSink`` from
this thread, docs/protocol.md §7.3), and SYNC *k* closes the channel's part of
pass *k* (its record count must match). What it landed is kept per pass as
(first page, count, pages whose check failed) until the main thread takes it.

``ChannelGather`` runs the readers. **The barrier**: a reader that read SYNC *k* waits
until every channel has read its SYNC *k* before it reads on; so no record of a later pass
lands before every record of pass *k* has, and a page re-sent in pass *k+1* on one channel
is never overwritten by its pass-*k* copy still travelling on another. ``barrier(k)`` is
the main thread's side: the ``StreamReader`` calls it at ITERATION *k* and, for the final
pass, at the first END_OF_STATE or the MANIFEST; it returns pass *k*'s landed records
(their torn pages are settled there, ``torn.py``, because a page torn on one channel may
come again verified on another). ``entries`` gives each channel's tally for the MANIFEST.

A channel that fails (a stream fault, the connection closing early or stalling for
``timeout_s``) stops all of them, and the next ``barrier`` raises its error, which names
the channel. ``stop`` shuts every channel down and joins the threads: nothing writes guest
memory after it returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Protocol

from vfiod.errors import VfiodError
from vfiod.migration.stream.manifest import ManifestEntry, Tally
from vfiod.migration.stream.pagecrc import PageCrcSink
from vfiod.migration.stream.ram import GuestRam
from vfiod.migration.stream.ram_landing import RamLanding
from vfiod.migration.stream.reader import fill_from
from vfiod.migration.stream.records import (
    DEFAULT_LIMITS,
    RECORD_HEADER_SIZE,
    ErrorCode,
    Limits,
    RecordError,
    RecordType,
    unpack_header,
)
from vfiod.migration.transport.control import TransportCode, TransportError

#: (first page, count, the pages of the record whose CRC failed: a LIVE record torn)
Landed = tuple[int, int, tuple[int, ...]]


class ChannelSource(Protocol):
    """What a channel needs of its connection (``tcp.Connection``)."""

    def recv_into(self, view: memoryview) -> int: ...

    def shutdown(self) -> None: ...

    def close(self) -> None: ...


class ChannelReader:
    def __init__(self, index: int, source: ChannelSource, ram: GuestRam, *,
                 offset: int, crcs: PageCrcSink | None = None,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        """``offset``: bytes the CHANNEL opening took (preamble and record); ``crcs``
        takes the per-page CRCs of every record that landed, as ``StreamReader``'s."""
        self.index = index
        self.source = source
        self._ram = ram
        self._crcs = crcs
        self._limits = limits
        self.records = 1              # CHANNEL was record 0
        self.offset = offset
        self.tally = Tally()
        self.synced = -1              # the last pass whose SYNC was read
        self.ended = False            # the source closed it after a SYNC
        self.passes: dict[int, list[Landed]] = {}
        self.current: list[Landed] = []
        self._hbuf = memoryview(bytearray(RECORD_HEADER_SIZE))
        self._landing = RamLanding()

    def read_record(self) -> int | None:
        """Read one record: RAM lands; returns the pass number of a SYNC, None for RAM;
        -1 at a clean end (EOF right after a SYNC)."""
        at = self.offset
        if not self._fill(self._hbuf, at, "a record header", eof_ok=True):
            if self.current or self.synced < 0:
                raise self._err(ErrorCode.TRUNCATED, "the channel ended inside a pass", at,
                                None)
            return -1
        h = unpack_header(self._hbuf, seq=self.records, offset=at, limits=self._limits)
        self.offset += RECORD_HEADER_SIZE
        if h.rtype == RecordType.SYNC:
            if h.arg0 <= self.synced or h.arg1 != self.records:
                raise self._err(ErrorCode.SEQUENCE, f"SYNC of pass {h.arg0} counting "
                                f"{h.arg1} records, after pass {self.synced} and "
                                f"{self.records} records", at, h.rtype)
            self.records += 1
            self.synced = h.arg0
            self.passes[h.arg0], self.current = self.current, []
            return h.arg0
        if h.rtype != RecordType.RAM:
            raise self._err(ErrorCode.ORDER, f"{RecordType(h.rtype).name} on a RAM channel",
                            at, h.rtype)
        self._land(h.arg0, h.arg1, h.length, h.payload_crc, h.flags, h.seq, at)
        return None

    def _land(self, first: int, n: int, length: int, crc: int, flags: int, seq: int,
              at: int) -> None:
        _, bad = self._landing.land(
            self._ram, first, n, length, crc, flags,
            fill=lambda view, what: self._fill(view, at, what),
            fail=lambda code, msg: self._err(code, msg, at, RecordType.RAM), crcs=self._crcs)
        self.offset += length
        self.tally.add(seq, first, n, n * self._ram.page_size, crc)
        self.records += 1
        self.current.append((first, n, tuple(first + int(i) for i in bad.tolist())))

    def _fill(self, view: memoryview, at: int, what: str, eof_ok: bool = False) -> int:
        got = fill_from(self.source, view)
        if got < len(view) and not (eof_ok and got == 0):
            raise self._err(ErrorCode.TRUNCATED, f"the channel ended {got} bytes into "
                            f"{what} of {len(view)} bytes", at, None)
        return got

    def _err(self, code: ErrorCode, msg: str, at: int, rtype: int | None) -> RecordError:
        return RecordError(code, f"RAM channel {self.index}: {msg}", record=self.records,
                           offset=at, rtype=rtype)


class ChannelGather:
    def __init__(self, readers: Sequence[ChannelReader], *, timeout_s: float) -> None:
        self.readers = list(readers)
        self._timeout_s = timeout_s
        self._cv = threading.Condition()
        self._released = -1           # every channel has read SYNC of this pass
        self._failure: BaseException | None = None
        self._stopping = False
        self._progress = 0            # records landed or synced, all channels
        #: channels the source closed, in the order they ended: a pass left short names
        #: the first (once one fails the source closes the others too)
        self._ended: list[ChannelReader] = []
        self._threads = [threading.Thread(target=self._run, args=(r,), daemon=True,
                                          name=f"vfiod-channel-{r.index}")
                         for r in self.readers]
        for t in self._threads:
            t.start()

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    @property
    def bytes_received(self) -> int:
        return sum(r.offset for r in self.readers)

    def barrier(self, number: int) -> list[Landed]:
        """Wait until every channel has read its SYNC ``number``; returns what the
        channels landed in that pass. Raises a channel's failure, or ``TransportError``
        (TIMEOUT) when no channel moved for ``timeout_s``."""
        with self._cv:
            seen, deadline = self._progress, time.monotonic() + self._timeout_s
            while self._failure is None and min(r.synced for r in self.readers) < number:
                gone = [r for r in self._ended if r.synced < number]
                if gone:
                    self._fail(RecordError(
                        ErrorCode.TRUNCATED, f"RAM channel {gone[0].index} closed before "
                        f"pass {number} was complete", record=gone[0].records,
                        offset=gone[0].offset))
                    break
                if self._progress != seen:
                    seen, deadline = self._progress, time.monotonic() + self._timeout_s
                left = deadline - time.monotonic()
                if left <= 0:
                    late = [r.index for r in self.readers if r.synced < number]
                    self._fail(TransportError(
                        TransportCode.TIMEOUT, f"channel {late[0]}",
                        f"RAM channel(s) {', '.join(map(str, late))}: pass {number} not "
                        f"complete, nothing received for {self._timeout_s:g} s"))
                    break
                self._cv.wait(min(left, 1.0))
            if self._failure is not None:
                raise self._failure
            out: list[Landed] = []
            for r in self.readers:
                part = r.passes.pop(number, None)
                if part is None:
                    raise RecordError(ErrorCode.SEQUENCE, f"RAM channel {r.index}: no SYNC "
                                      f"of pass {number}", record=r.records, offset=r.offset,
                                      rtype=RecordType.SYNC)
                out += part
            return out

    def entries(self) -> tuple[ManifestEntry, ...]:
        return tuple(r.tally.entry(f"channel {r.index}") for r in self.readers)

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for r in self.readers:
            r.source.shutdown()
        for t in self._threads:
            t.join()
        for r in self.readers:
            r.source.close()

    def _fail(self, e: BaseException) -> None:
        """First failure wins; every channel stops (the source sees its sends fail)."""
        if self._failure is None:
            self._failure = e
        self._stopping = True
        self._cv.notify_all()
        for r in self.readers:
            r.source.shutdown()

    def _run(self, r: ChannelReader) -> None:
        try:
            while True:
                number = r.read_record()
                with self._cv:
                    if self._stopping:
                        return
                    self._progress += 1
                    if number is None:
                        continue
                    if number < 0:
                        r.ended = True
                        self._ended.append(r)
                        self._cv.notify_all()
                        return
                    if all(x.synced >= number for x in self.readers):
                        self._released = number
                        self._cv.notify_all()
                    while self._released < number and not self._stopping:
                        self._cv.wait()           # the barrier: the others finish pass k
                    if self._stopping:
                        return
        except TransportError as e:
            msg = str(e).removeprefix(e.peer + ": ")
            self._failed(TransportError(e.code, e.peer, f"RAM channel {r.index}: {msg}",
                                        errno=e.errno))
        except (VfiodError, OSError) as e:
            self._failed(e if isinstance(e, VfiodError) else TransportError(
                TransportCode.IO, f"channel {r.index}", f"RAM channel {r.index}: {e}"))

    def _failed(self, e: BaseException) -> None:
        with self._cv:
            if not self._stopping:
                self._fail(e)

