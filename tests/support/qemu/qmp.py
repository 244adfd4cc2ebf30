"""A small test-side QMP client for the QEMU VM tier (docs/architecture.md §8.3).

One connection to one ``-qmp unix:...`` socket: the greeting, ``qmp_capabilities``,
``execute`` (returns ``return``, raises ``QmpCommandError`` on ``error``) and the events
QEMU sent in between, kept in order for ``wait_event``. A QMP socket serves one client at
a time (docs/architecture.md §8.4): the rig gives each QEMU a second socket for vfiod, and this
client only ever uses the test's.

Every read has a deadline: a QEMU that stops answering fails the test naming the command.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

DEFAULT_TIMEOUT = 10.0


class QmpCommandError(RuntimeError):
    """QEMU answered a command with ``error``; carries its class and description."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.command = command
        self.error_class = str(error.get("class", "?"))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"QMP {command}: {self.error_class}: {self.desc}")


class QmpClient:
    """A connected, negotiated QMP session; ``events`` holds every event not yet taken."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(path)
            deadline = time.monotonic() + timeout
            greeting = self._read_message(deadline, "the greeting")
            if "QMP" not in greeting:
                raise ConnectionError(f"{path}: not a QMP greeting: {greeting!r}")
            self.greeting = greeting["QMP"]
            self.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def _read_message(self, deadline: float, what: str) -> dict[str, Any]:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"QMP {self.path}: no answer for {what} in time")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionError(f"QMP {self.path}: QEMU closed the socket waiting for "
                                      f"{what}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ConnectionError(f"QMP {self.path}: not a JSON object: {line!r}")
        return message

    def execute(self, command: str, timeout: float = DEFAULT_TIMEOUT,
                **arguments: Any) -> Any:
        """Run ``command`` with ``arguments`` (``-`` spelled ``_`` is not translated: pass
        QMP's own names through ``**{"name-with-dash": v}``); events that arrive before the
        answer go to ``events``."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            message = self._read_message(deadline, command)
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                raise QmpCommandError(command, message["error"])
            elif "return" in message:
                return message["return"]
            else:
                raise ConnectionError(f"QMP {self.path}: unexpected message {message!r}")

    def wait_event(self, name: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The first event called ``name`` (taken out of ``events``), reading until it
        comes or the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event["event"] == name:
                    return self.events.pop(i)
            message = self._read_message(deadline, f"event {name}")
            if "event" not in message:
                raise ConnectionError(f"QMP {self.path}: unasked answer {message!r}")
            self.events.append(message)
