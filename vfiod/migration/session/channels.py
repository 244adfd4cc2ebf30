"""RAM channels: setting up a multi-connection migration (docs/protocol.md §12).

Negotiation. A destination that can accept channels (its session has a
``channel_acceptor``) says so in ACK hello: ``"channels": <at most>``. A source that wants
N > 1 (``SessionConfig.channels``) and can open them (a ``channel_dialer``) takes
min(N, that) and announces the number in the HEADER (``"channels"``); against a
destination whose hello has no such field it sends the single-connection stream,
unchanged. After ACK header the source dials each channel and opens it with the CHANNEL
record (migration id, the hello's challenge, its number: ``stream/channel_hello.py``);
the destination accepts them within ``ack_timeout_s``, refuses (closes) any whose id or
challenge is not this migration's, or that repeats a number, and waits on for the real
ones. Then RAM travels on the channels (``transport/channel_send.py``,
``channel_receive.py``); the main connection keeps everything else.

``ChannelDialer``: (channel number, channel count) → a connection to the destination (the
daemon connects to the peer's migration port with an offer of kind ``channel``, paced to
its share of a bandwidth limit; a test, to a listener of its own). ``ChannelAcceptor``: seconds → the next incoming channel
connection, or ``TransportError`` (ACCEPT_TIMEOUT).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from vfiod.migration.session.common import SessionBase
from vfiod.migration.stream.channel_hello import ChannelHello, read_channel_hello
from vfiod.migration.stream.header import MAX_CHANNELS
from vfiod.migration.stream.pagecrc import PageCrcSink
from vfiod.migration.stream.ram import GuestRam
from vfiod.migration.stream.reader import StreamReader
from vfiod.migration.stream.records import PREAMBLE_SIZE, RECORD_HEADER_SIZE, RecordError
from vfiod.migration.stream.writer import StreamWriter
from vfiod.migration.transport.channel_receive import ChannelGather, ChannelReader
from vfiod.migration.transport.channel_send import ChannelFanout, ChannelLink, ChannelWriter
from vfiod.migration.transport.control import TransportCode, TransportError
from vfiod.migration.transport.tcp import Connection

ChannelDialer = Callable[[int, int], ChannelLink]
ChannelAcceptor = Callable[[float], Connection]


def channels_to_open(wanted: int, hello: dict[str, Any], can_dial: bool) -> int:
    """How many RAM channels the source opens: 1 (the main connection carries RAM) unless
    it wants more, can dial, and the destination's hello offers them."""
    offered = hello.get("channels")
    if wanted < 2 or not can_dial or not isinstance(offered, int) or isinstance(offered, bool):
        return 1
    n = min(wanted, offered, MAX_CHANNELS)
    return n if n >= 2 else 1


def open_channels(dial: ChannelDialer, n: int, migration_id: str, challenge: str,
                  page_size: int) -> ChannelFanout:
    """Dial channels 1..n and open each with its CHANNEL record."""
    writers: list[ChannelWriter] = []
    try:
        for i in range(1, n + 1):
            try:
                conn = dial(i, n)
            except TransportError as e:
                raise TransportError(e.code, e.peer, f"RAM channel {i}: "
                                     f"{str(e).removeprefix(e.peer + ': ')}",
                                     errno=e.errno) from None
            writers.append(ChannelWriter(i, conn, page_size))
            conn.send_buffers(ChannelHello(migration_id, challenge, i, n).opening())
        return ChannelFanout(writers)
    except BaseException:
        for w in writers:
            w.sink.close()
        raise


def accept_channels(accept: ChannelAcceptor, n: int, migration_id: str, challenge: str,
                    ram: GuestRam, timeout_s: float,
                    refused: Callable[[str], None],
                    crcs: PageCrcSink | None = None) -> ChannelGather:
    """Accept channels 1..n of this migration within ``timeout_s``; a connection that is
    not one of them is closed and reported to ``refused``. Each channel hands the CRCs of
    the pages it landed to ``crcs``."""
    deadline = time.monotonic() + timeout_s
    readers: dict[int, ChannelReader] = {}
    try:
        while len(readers) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(1, n + 1)) - set(readers))
                raise TransportError(TransportCode.ACCEPT_TIMEOUT, "channels",
                                     f"RAM channel(s) {', '.join(map(str, missing))} of "
                                     f"{n} did not connect within {timeout_s:g} s")
            conn = accept(left)
            io_timeout = conn.io_timeout
            conn.set_io_timeout(max(0.1, min(left, 10.0)))   # a silent stranger: bounded
            try:
                hello = read_channel_hello(conn)
                why = _not_ours(hello, migration_id, challenge, n, readers)
            except (RecordError, TransportError) as e:
                why = str(e)
            if why:
                refused(f"channel connection from {conn.peer} refused: {why}")
                conn.close()
                continue
            conn.set_io_timeout(io_timeout)
            opening = PREAMBLE_SIZE + RECORD_HEADER_SIZE + len(hello.to_json())
            readers[hello.channel] = ChannelReader(hello.channel, conn, ram, offset=opening,
                                                   crcs=crcs)
    except BaseException:
        for r in readers.values():
            r.source.close()
        raise
    return ChannelGather([readers[i] for i in range(1, n + 1)], timeout_s=timeout_s)


def _not_ours(hello: ChannelHello, migration_id: str, challenge: str, n: int,
              readers: dict[int, ChannelReader]) -> str:
    if not secrets.compare_digest(hello.challenge, challenge):
        return "it does not answer this migration's challenge"
    if hello.migration_id != migration_id:
        return f"it names migration {hello.migration_id!r}"
    if hello.channels != n:
        return f"it counts {hello.channels} channels, the HEADER {n}"
    if hello.channel in readers:
        return f"channel {hello.channel} is connected already"
    return ""


class SourceChannels(SessionBase):
    """Mixed into ``SourceSession``: set ``channel_dialer`` to allow channels."""

    channel_dialer: ChannelDialer | None = None
    writer: StreamWriter | None

    def _channels_wanted(self, hello: dict[str, Any]) -> int:
        return channels_to_open(self.config.channels, hello, self.channel_dialer is not None)

    def _open_channels(self, n: int) -> None:
        """After ACK header: dial the channels the HEADER announced."""
        self.result.timings["channels"] = n
        if n < 2:
            return
        assert self.channel_dialer is not None and self.writer is not None
        self.writer.attach_channels(open_channels(
            self.channel_dialer, n, self.migration_id, self.challenge,
            self.guest.page_size))


class DestChannels(SessionBase):
    """Mixed into ``DestinationSession``: set ``channel_acceptor`` to accept channels."""

    channel_acceptor: ChannelAcceptor | None = None
    reader: StreamReader | None

    def _channels_hello(self) -> dict[str, Any]:
        return {} if self.channel_acceptor is None else {"channels": MAX_CHANNELS}

    def _accept_channels(self, n: int, ram: GuestRam, crcs: PageCrcSink) -> None:
        """After ACK header: the channels the HEADER announced."""
        self.result.timings["channels"] = n
        if n < 2:
            return
        assert self.reader is not None
        if self.channel_acceptor is None:     # the HEADER asks what the hello did not offer
            raise TransportError(TransportCode.CONTROL, "channels", f"the HEADER announces "
                                 f"{n} RAM channels; this destination offered none")
        self.reader.attach_channels(accept_channels(
            self.channel_acceptor, n, self.migration_id, self.challenge, ram,
            self.config.ack_timeout_s, self.result.warnings.append, crcs))
