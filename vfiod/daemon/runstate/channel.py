"""A JSON-lines connection to a VMM's Unix socket with per-call deadlines, shared by the
QMP and the line-protocol run-state backends (docs/architecture.md §8.2).

Every read and the connect itself are bounded by the caller's absolute deadline
(``time.monotonic()``), so a VMM that accepts and then says nothing cannot hold vfiod
past it. A line longer than ``MAX_VMM_LINE`` is a protocol error (the stream cannot be
re-synchronised after it).
"""

from __future__ import annotations

import errno
import json
import socket
from typing import Any

from vfiod.daemon.runstate.contract import RunStateError, time_left

#: Longest line accepted from a VMM (QMP answers to the few commands used are < 1 KiB).
MAX_VMM_LINE = 1 << 20


class VmmChannel:
    """One connection; ``what`` names it in every error (e.g. ``QMP /run/vm1.qmp``)."""

    def __init__(self, path: str, what: str, deadline: float) -> None:
        self.what = what
        self._buf = b""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(time_left(deadline, f"{what}: connect"))
        try:
            sock.connect(path)
        except TimeoutError:
            sock.close()
            raise RunStateError("timeout", f"{what}: connect did not complete before the "
                                "deadline") from None
        except OSError as e:
            sock.close()
            name = errno.errorcode.get(e.errno or 0, str(e))
            raise RunStateError("connect", f"{what}: cannot connect: {name} (is the VMM "
                                "running with this socket?)") from None
        self.sock = sock

    def send(self, obj: dict[str, Any], deadline: float) -> None:
        self.sock.settimeout(time_left(deadline, f"{self.what}: send"))
        try:
            self.sock.sendall(json.dumps(obj).encode() + b"\n")
        except TimeoutError:
            raise RunStateError("timeout", f"{self.what}: the VMM did not take the request "
                                "before the deadline") from None
        except OSError as e:
            raise RunStateError("connect", f"{self.what}: lost the VMM while sending: "
                                f"{errno.errorcode.get(e.errno or 0, e)}") from None

    def receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        """The next JSON object the VMM sends; ``waiting_for`` names it in a timeout."""
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_VMM_LINE:
                raise RunStateError("protocol", f"{self.what}: a line longer than "
                                    f"{MAX_VMM_LINE} bytes")
            self.sock.settimeout(time_left(deadline, f"{self.what}: {waiting_for}"))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise RunStateError("timeout", f"{self.what}: {waiting_for}: no answer "
                                    "before the deadline") from None
            except OSError as e:
                raise RunStateError("connect", f"{self.what}: lost the VMM: "
                                    f"{errno.errorcode.get(e.errno or 0, e)}") from None
            if not chunk:
                raise RunStateError("connect", f"{self.what}: the VMM closed the connection "
                                    f"while vfiod waited for {waiting_for}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            obj = json.loads(line)
        except ValueError:
            raise RunStateError("protocol", f"{self.what}: not JSON: "
                                f"{line[:200]!r}") from None
        if not isinstance(obj, dict):
            raise RunStateError("protocol", f"{self.what}: expected a JSON object, got "
                                f"{line[:200]!r}")
        return obj

    def close(self) -> None:
        self.sock.close()
