"""Transports for the migration stream (docs/architecture.md §5): TCP with a return path and optional
mutual TLS (``tcp``), snapshot files (``files``), and the return-path control messages and
``TransportError`` (``control``). Each implements the ``StreamSink``/``Source``. RAM
channels (docs/protocol.md §12): ``channel_send`` (source threads), ``channel_receive``
(destination threads and the pass barrier).
"""

from vfiod.migration.transport.control import (
    AckStage,
    ControlMessage,
    ControlType,
    TransportCode,
    TransportError,
)
from vfiod.migration.transport.files import FileSink, FileSource
from vfiod.migration.transport.tcp import Connection, Listener, TlsConfig, connect

__all__ = [
    "AckStage", "Connection", "ControlMessage", "ControlType", "FileSink", "FileSource",
    "Listener", "TlsConfig", "TransportCode", "TransportError", "connect",
]
