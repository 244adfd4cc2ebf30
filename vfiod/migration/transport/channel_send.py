"""The source's RAM channels: RAM records spread over N extra connections
(docs/protocol.md §12).

``ChannelFanout`` owns one ``ChannelWriter`` and one sending thread per channel. The
``StreamWriter`` hands it batches of RAM records (``submit``); batch *i* of a pass goes to
channel *i mod N* (a pass restarts at channel 1), and that channel's thread computes the
per-page CRC table, frames the records with the channel's own sequence numbers and sends
them; a quiescent batch's tables also go to its ``PageCrcSink`` from that thread
(docs/protocol.md §7.3). A page is sent at most once per pass, so order only matters between passes:
``sync(k)`` queues a SYNC record for pass *k* on every channel, after everything of that
pass, and the destination lets no channel land a record of a later pass before every
channel's SYNC *k* has arrived (``channel_reader.py``). ``drain`` waits until every
queued batch is on its socket and returns what was sent, so a ``send_ram`` call still ends
with its pages sent; ``entries`` gives each channel's tally for the MANIFEST.

A channel whose send fails stops the fan-out: the next call raises its ``TransportError``
with the channel named (the migration then fails and rolls back). The queues are short
(``depth`` batches per channel): the caller's slices are paced by the slowest channel.
Why threads pay off: the CRC kernel (numba, ``nogil``) and ``sendmsg`` both run without
the GIL, so N channels use up to N cores.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from vfiod.migration.stream.crc32c import crc32c
from vfiod.migration.stream.manifest import ManifestEntry, Tally
from vfiod.migration.stream.pagecrc import PageCrcSink, page_crcs
from vfiod.migration.stream.records import RECORD_HEADER_SIZE, RecordType, pack_header
from vfiod.migration.transport.control import TransportCode, TransportError

_Rec = tuple[int, int, int, memoryview]  # region index, first page, count, guest memory


class ChannelLink(Protocol):
    """What a channel needs of its connection (``tcp.Connection``)."""

    def send_buffers(self, buffers: Sequence[Any]) -> None: ...

    def shutdown(self) -> None: ...

    def close(self) -> None: ...


class ChannelWriter:
    """One channel's records: its own sequence numbers (CHANNEL is 0) and its tally."""

    def __init__(self, index: int, sink: ChannelLink, page_size: int) -> None:
        self.index = index
        self.sink = sink
        self._page_size = page_size
        self._seq = 1                 # the CHANNEL record was 0
        self.tally = Tally()
        self.bytes_sent = 0

    def send_batch(self, batch: Sequence[_Rec], flags: int,
                   crcs: PageCrcSink | None = None) -> None:
        iov: list[Any] = []
        size = 0
        for _, page, n, view in batch:
            table: np.ndarray = page_crcs(view, self._page_size)
            if crcs is not None:
                crcs.take_page_crcs(page, table)
            crc = crc32c(table)
            length = n * 4 + len(view)
            iov += (pack_header(RecordType.RAM, self._seq & 0xFFFFFFFF, length, page, n, crc,
                                flags), memoryview(table).cast("B"), view)  # type: ignore[arg-type]
            self.tally.add(self._seq, page, n, len(view), crc)
            self._seq += 1
            size += RECORD_HEADER_SIZE + length
        self.sink.send_buffers(iov)
        self.bytes_sent += size

    def sync(self, number: int) -> None:
        """SYNC: this channel's part of pass ``number`` is complete; arg1 counts the
        channel's records before it (the CHANNEL record included)."""
        self.sink.send_buffers([pack_header(RecordType.SYNC, self._seq & 0xFFFFFFFF, 0,
                                            number, self._seq)])
        self._seq += 1
        self.bytes_sent += RECORD_HEADER_SIZE


class ChannelFanout:
    def __init__(self, writers: Sequence[ChannelWriter], *, depth: int = 2) -> None:
        if len(writers) < 2:
            raise ValueError("a fan-out needs at least two channels")
        self.writers = list(writers)
        self._depth = depth
        self._work: list[deque[tuple[str, Any, int]]] = [deque() for _ in writers]
        self._cv = threading.Condition()
        self._failure: TransportError | None = None
        self._stopping = False
        self._next = 0
        self._drained = 0             # bytes already reported by drain()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                          name=f"vfiod-channel-{w.index}")
                         for i, w in enumerate(writers)]
        for t in self._threads:
            t.start()

    @property
    def bytes_sent(self) -> int:
        return sum(w.bytes_sent for w in self.writers)

    def submit(self, batch: list[_Rec], flags: int, crcs: PageCrcSink | None = None) -> None:
        """Queue one batch of RAM records on the next channel (waits while it is full);
        its per-page CRC tables go to ``crcs`` as the channel computes them."""
        i = self._next
        self._next = (i + 1) % len(self.writers)
        self._put(i, ("ram", (batch, crcs), flags))

    def sync(self, number: int) -> None:
        """Queue SYNC ``number`` on every channel, after what each holds (``drain``
        waits until it is sent); the next pass starts again at channel 1."""
        for i in range(len(self.writers)):
            self._put(i, ("sync", None, number))
        self._next = 0

    def drain(self) -> int:
        """Wait until every channel sent what it was given; returns the bytes sent since
        the last drain. Raises the first channel failure."""
        with self._cv:
            while any(self._work) and self._failure is None:
                self._cv.wait()
            self._raise_failure()
        now = self.bytes_sent
        sent, self._drained = now - self._drained, now
        return sent

    def entries(self) -> tuple[ManifestEntry, ...]:
        return tuple(w.tally.entry(f"channel {w.index}") for w in self.writers)

    def close(self, *, abort: bool = False) -> None:
        """Stop the threads (``abort``: drop what is queued) and close every channel."""
        with self._cv:
            self._stopping = True
            if abort:
                for q in self._work:
                    q.clear()
            self._cv.notify_all()
        if abort:                     # a thread blocked in a send: its socket goes now
            for w in self.writers:
                w.sink.shutdown()
        for t in self._threads:
            t.join()
        for w in self.writers:
            w.sink.close()

    def _put(self, i: int, item: tuple[str, Any, int]) -> None:
        with self._cv:
            while len(self._work[i]) >= self._depth and self._failure is None:
                self._cv.wait()
            self._raise_failure()
            self._work[i].append(item)
            self._cv.notify_all()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _run(self, i: int) -> None:
        w, q = self.writers[i], self._work[i]
        while True:
            with self._cv:
                while not q and not self._stopping:
                    self._cv.wait()
                if not q:
                    return
                kind, batch, arg = q[0]
            try:
                if kind == "ram":
                    records, crcs = batch
                    w.send_batch(records, arg, crcs)
                else:
                    w.sync(arg)
            except Exception as e:  # noqa: BLE001 - raised to the session by the next call
                with self._cv:
                    if self._failure is None:
                        self._failure = _named(w.index, e)
                    q.clear()
                    self._cv.notify_all()
                return
            with self._cv:
                if q:
                    q.popleft()
                self._cv.notify_all()


def _named(index: int, e: Exception) -> TransportError:
    if isinstance(e, TransportError):
        return TransportError(e.code, e.peer, f"RAM channel {index}: "
                              f"{str(e).removeprefix(e.peer + ': ')}", errno=e.errno)
    return TransportError(TransportCode.IO, f"channel {index}",
                          f"RAM channel {index}: {type(e).__name__}: {e}")

