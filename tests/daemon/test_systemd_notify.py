"""sd_notify over a real datagram socket and the watchdog's liveness rule (docs/architecture.md §6)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from tests.support.daemons import NotifySocket, wait_until
from vfiod.daemon.systemd import Heartbeat, Notifier, Watchdog, watchdog_interval


def test_notify_to_a_path_socket(tmp_path: Path) -> None:
    sink = NotifySocket(tmp_path)
    try:
        n = Notifier({"NOTIFY_SOCKET": sink.path})
        assert n.enabled
        assert n.ready("serving 2 guests\nsecond line")
        assert n.reloading() and n.stopping() and n.watchdog()
        wait_until(lambda: len(sink.messages) >= 4, 10, "4 datagrams", sink.poll)
        ready, reloading, stopping, ping = sink.messages[:4]
        assert ready == {"READY": "1", "STATUS": "serving 2 guests second line"}
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert stopping == {"STOPPING": "1", "STATUS": "stopping"}
        assert ping == {"WATCHDOG": "1"}
        n.close()
    finally:
        sink.close()


def test_notify_to_an_abstract_socket() -> None:
    name = f"vfiod-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(10)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("hi")
        assert sock.recv(100) == b"STATUS=hi"
    finally:
        sock.close()


def test_without_systemd_nothing_is_sent(tmp_path: Path) -> None:
    assert not Notifier({}).enabled and Notifier({}).ready("x") is False
    assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled
    # A vanished systemd socket is logged, not fatal.
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready("x") is False


@pytest.mark.parametrize("env, pid, expected", [
    ({}, 1, None),
    ({"WATCHDOG_USEC": "30000000"}, 1, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, 1, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "2"}, 1, None),   # someone else's
    ({"WATCHDOG_USEC": "soon"}, 1, None),
    ({"WATCHDOG_USEC": "0"}, 1, None),
])
def test_watchdog_interval(env: dict[str, str], pid: int, expected: float | None) -> None:
    assert watchdog_interval(env, pid) == expected


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class _Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__({})
        self.sent: list[dict[str, str | int]] = []

    def notify(self, **fields: str | int) -> bool:
        self.sent.append(fields)
        return True


def test_watchdog_pings_only_while_the_main_loop_beats() -> None:
    clock = _Clock()
    beat = Heartbeat(clock)
    note = _Recorder()
    dog = Watchdog(note, 10.0, beat)
    assert dog.tick() and note.sent == [{"watchdog": 1}]
    clock.t += 9.9                          # main loop quiet, but within the interval
    assert dog.tick()
    clock.t += 0.2                          # now silent for longer than the interval
    assert not dog.tick() and dog.stalled
    assert len(note.sent) == 2              # no ping: systemd will restart the daemon
    beat.beat()                             # the loop is back
    assert dog.tick() and not dog.stalled and len(note.sent) == 3
    with pytest.raises(ValueError, match="must be positive"):
        Watchdog(note, 0, beat)


def test_watchdog_thread_pings_a_real_socket(tmp_path: Path) -> None:
    sink = NotifySocket(tmp_path)
    dog = Watchdog(Notifier({"NOTIFY_SOCKET": sink.path}), 0.2, Heartbeat())
    try:
        beat = dog.heartbeat
        dog.start()

        def two_pings() -> bool:
            beat.beat()
            return sum(m.get("WATCHDOG") == "1" for m in sink.messages) >= 2
        wait_until(two_pings, 10, "two watchdog pings", sink.poll)
    finally:
        dog.stop()
        sink.close()


def test_notify_never_blocks_when_systemd_does_not_read(tmp_path: Path) -> None:
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(tmp_path / "notify.sock"))      # bound, never read: its queue fills
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    sent: list[bool] = []
    t = threading.Thread(target=lambda: sent.extend(n.watchdog() for _ in range(5000)),
                         daemon=True)
    try:
        t.start()
        t.join(20)
        assert not t.is_alive(), "sd_notify blocked on a full queue"
        assert sent[0] and not sent[-1]           # delivered, then dropped
        sink.recv(100)                            # the queue drains: delivered again
        assert n.watchdog()
    finally:
        sink.close()                              # unblocks a sender stuck on it
        n.close()
