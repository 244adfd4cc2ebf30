"""systemd integration without a dependency: ``sd_notify`` and the watchdog (docs/architecture.md §6,
sd_notify(3)).

The notify protocol is one datagram of ``KEY=VALUE`` lines to the Unix socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). vfiod sends
``READY=1`` once the control socket listens and the guests are open, ``STATUS=...`` for
``systemctl status``, ``RELOADING=1``/``READY=1`` around a SIGHUP reload, ``STOPPING=1``
on shutdown, and ``WATCHDOG=1`` pings.

The watchdog is fed by its own thread, never by the migration loop (which may block in a
long send), but only while the main loop proves it is alive: the main loop beats a
``Heartbeat`` on every turn, and the thread pings only if the last beat is younger than the
watchdog interval. A wedged main loop therefore stops the pings and systemd restarts vfiod,
which is the point of the watchdog. ``WATCHDOG_USEC`` gives the interval; ``WATCHDOG_PID``,
when set, must be this process (otherwise the watchdog belongs to someone else).

Sending never blocks (``MSG_DONTWAIT``): a systemd that does not read its socket fills the
queue, and a blocked send would hold up the caller (the reload, the shutdown, the
watchdog thread); the datagram is dropped instead and the drop is logged once per streak.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("vfiod.systemd")


class Notifier:
    """Sends notify datagrams to ``$NOTIFY_SOCKET``; a no-op when it is not set."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if addr.startswith("@"):
            self.address = "\0" + addr[1:]           # abstract namespace
        elif addr.startswith("/"):
            self.address = addr
        elif addr:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor @abstract: ignored", addr)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._dropping = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (``ready=1`` → ``READY=1``); False if not delivered."""
        if self.address is None:
            return False
        msg = "\n".join(f"{k.upper()}={_one_line(v)}" for k, v in fields.items()).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX,
                                               socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(msg, socket.MSG_DONTWAIT, self.address)
                self._dropping = False
                return True
            except BlockingIOError:
                if not self._dropping:
                    log.warning("sd_notify to %r: its queue is full (systemd is not "
                                "reading); dropping notifications until it drains",
                                self.address)
                self._dropping = True
                return False
            except OSError as e:
                # systemd gone or the socket unreachable: log, never kill the daemon for it.
                log.warning("sd_notify to %r failed: %s", self.address, e.strerror)
                return False

    def ready(self, status: str) -> bool:
        return self.notify(ready=1, status=status)

    def status(self, text: str) -> bool:
        return self.notify(status=text)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (253+, Type=notify-reload) order the reload.
        return self.notify(reloading=1, monotonic_usec=time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(stopping=1, status=status)

    def watchdog(self) -> bool:
        return self.notify(watchdog=1)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _one_line(v: str | int) -> str:
    return str(v).replace("\n", " ")


def watchdog_interval(env: Mapping[str, str] | None = None,
                      pid: int | None = None) -> float | None:
    """Seconds from ``WATCHDOG_USEC`` if the watchdog is meant for this process."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner.isdigit() and int(owner) != (pid if pid is not None else os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number: watchdog off", usec)
        return None
    return value / 1e6 if value > 0 else None


class Heartbeat:
    """The main loop's proof of life: ``beat()`` every turn, ``age()`` since the last."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def age(self) -> float:
        return self._clock() - self._last


class Watchdog:
    """Pings every ``interval / 2`` while ``heartbeat.age() < interval``."""

    def __init__(self, notifier: Notifier, interval_s: float, heartbeat: Heartbeat) -> None:
        if interval_s <= 0:
            raise ValueError(f"watchdog interval {interval_s} s must be positive")
        self.notifier = notifier
        self.interval = interval_s
        self.heartbeat = heartbeat
        self.pings = 0
        self.stalled = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vfiod-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def tick(self) -> bool:
        """One decision: ping if the main loop is alive. Returns whether it pinged."""
        age = self.heartbeat.age()
        if age >= self.interval:
            if not self.stalled:
                log.error("main loop silent for %.1f s (watchdog %.1f s): not feeding the "
                          "watchdog, systemd will restart vfiod", age, self.interval)
            self.stalled = True
            return False
        self.stalled = False
        if self.notifier.watchdog():
            self.pings += 1
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval / 2):
            self.tick()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
