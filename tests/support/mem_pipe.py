"""A stream's sink and source over one bytearray, for the stream tests (docs/protocol.md
§3-§7): what the writer sends is appended, what the reader receives is read back in order."""

from __future__ import annotations

from typing import Any


class MemPipe:
    """``StreamSink`` and ``Source`` over ``data`` (initially the given bytes); ``piece``
    caps each read as a socket would; ``sends`` counts the sink's calls."""

    def __init__(self, data: bytes = b"", piece: int = 1 << 30) -> None:
        self.data = bytearray(data)
        self.pos = 0
        self.piece = piece
        self.sends = 0

    def send_buffers(self, buffers: Any) -> None:
        self.sends += 1
        for b in buffers:
            self.data += b

    def check_peer(self) -> None:
        pass

    def recv_into(self, view: memoryview) -> int:
        n = min(len(view), len(self.data) - self.pos, self.piece)
        view[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n
