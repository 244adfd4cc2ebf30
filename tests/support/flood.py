"""The flood of issue 12 from one client process (README "Limits"): idle control
connections on each daemon, and on a migration port silent, slow and malformed
connections (on a TLS port the malformed ones are TLS garbage).

``Flood`` is a context manager: entering opens every connection; while it is held, a
thread sends each slow connection one byte a second (a trickled offer header; on a TLS
port, a trickled non-handshake), bounded by ``slow_for_s`` and by the ``SLOW_PAYLOAD``
length; leaving stops the thread and closes everything. The daemon may close any of them
(idle and offer deadlines, the pending-offer bound): a slow connection it closed is
dropped from the trickle, not an error. ``tests/daemon/test_flood.py`` and
``tests/bench/bench_flood.py`` use it.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from types import TracebackType

#: What a slow client trickles, one byte a second: the start of a plausible offer.
SLOW_PAYLOAD = b"VFIOD-OFFER " + b"x" * 120
MALFORMED = struct.pack("<8sI", b"GET / HT", 1 << 30)   # bad magic, huge length


def address(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) as a socket address."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class Flood:
    def __init__(self, control_sockets: list[str], migration_port: tuple[str, int], *,
                 idle: int = 100, silent: int = 50, slow: int = 50, malformed: int = 50,
                 slow_for_s: float = 60.0) -> None:
        self.control_sockets = control_sockets
        self.migration_port = migration_port
        self.counts = {"idle": idle, "silent": silent, "slow": slow, "malformed": malformed}
        self.slow_for_s = slow_for_s
        self.held: list[socket.socket] = []
        self.slow: list[socket.socket] = []
        self.trickled = 0                  # bytes the slow clients managed to send
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, name="flood-slow", daemon=True)

    def __enter__(self) -> Flood:
        try:
            for path in self.control_sockets:
                for _ in range(self.counts["idle"]):
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self.held.append(s)
                    s.connect(path)                    # idle: never sends a request
            for kind in self._port_kinds():
                s = socket.create_connection(self.migration_port, timeout=10)
                self.held.append(s)
                if kind == "malformed":
                    s.sendall(MALFORMED)
                elif kind == "slow":
                    self.slow.append(s)
        except BaseException:
            self._close()
            raise
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._close()

    def _port_kinds(self) -> list[str]:
        """The migration-port connections, interleaved kind by kind as a mixed crowd."""
        left = {k: self.counts[k] for k in ("silent", "slow", "malformed")}
        order = []
        while any(left.values()):
            for k, n in left.items():
                if n:
                    order.append(k)
                    left[k] = n - 1
        return order

    def _close(self) -> None:
        for s in self.held:
            s.close()

    def _trickle(self) -> None:
        """One byte a second to every slow connection still open, on a monotonic schedule."""
        start = time.monotonic()
        live = list(self.slow)
        for i in range(len(SLOW_PAYLOAD)):
            due = start + i
            if due - start > self.slow_for_s or not live:
                return
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            still = []
            for s in live:
                try:
                    s.send(SLOW_PAYLOAD[i:i + 1], socket.MSG_DONTWAIT)
                except OSError:                  # closed by the daemon's deadline or bound
                    continue
                self.trickled += 1
                still.append(s)
            live = still
