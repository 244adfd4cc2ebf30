"""A real daemon's ``status`` after each change (``daemon/status_pieces.py``): the answer
about every guest and the answer about one, asked right after an opt-out, and at every
step of a migration to a second daemon and after it (the source's guest then waits to
receive it back: ``incoming``), show the change; none is an answer
kept from before it. Every answer line is also byte for byte the line its result gives
when encoded whole (the pieces it is spliced from fit together).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.daemon_configs import SOURCE_DEVICES, host_config
from tests.support.daemons import DaemonProcess, daemon_pair, wait_until
from vfiod.api.schema import Request, Response


class RawStatus:
    """One control connection reading answers as raw lines."""

    def __init__(self, d: DaemonProcess) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(d.socket)
        self.file = self.sock.makefile("rb")
        self.rid = 0

    def status(self, guest: str | None = None) -> dict[str, Any]:
        self.rid += 1
        self.sock.sendall(Request("status", {"guest": guest} if guest else {},
                                  self.rid).encode())
        line = self.file.readline()
        result = json.loads(line)["result"]
        assert line == Response.success(self.rid, result).encode()
        return result

    def guest(self, name: str, whole: bool) -> dict[str, Any]:
        """``name``'s row from the answer about every guest, or from its own."""
        rows = self.status(None if whole else name)["guests"]
        return next(g for g in rows if g["name"] == name)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def pair() -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    with daemon_pair(host_config("source", guests=("g1", "g2"),
                                 workloads={"g1": ("128KiB", "2MiB")}),
                     host_config("destination", guests=("g1", "g2")),
                     "fresh-src", "fresh-dst") as daemons:
        yield daemons


@pytest.fixture
def raw(pair: tuple[DaemonProcess, DaemonProcess]) -> Iterator[RawStatus]:
    r = RawStatus(pair[0])
    yield r
    r.close()


@pytest.mark.parametrize("whole", [True, False])
def test_an_opt_out_shows_in_the_next_answer(pair: tuple[DaemonProcess, DaemonProcess],
                                             raw: RawStatus, whole: bool) -> None:
    src, _ = pair
    device = SOURCE_DEVICES["g1"][0]

    def flag() -> bool:
        row = raw.guest("g1", whole)
        return next(d for d in row["devices"] if d["name"] == device)[
            "pre_copy_dirty_page_tracking"]
    for _ in range(3):                      # the pieces are kept by now
        assert flag() is True
    src.call("dirty_tracking", {"device": device, "enabled": False})
    assert flag() is False
    src.call("dirty_tracking", {"device": device, "enabled": True})
    assert flag() is True


def test_every_step_of_a_migration_shows(pair: tuple[DaemonProcess, DaemonProcess],
                                         raw: RawStatus) -> None:
    src, dst = pair
    for whole in (True, False, True):
        assert raw.guest("g1", whole)["state"] == "running"
    assert raw.status()["finished"] == []
    mid = src.call("migrate", {"guest": "g1", "to": dst.migration_address, "timeout_s": 60,
                               "on_timeout": "force"})["migration"]["id"]
    # The very next answers show the migration, both kinds, whatever step it is at.
    for whole in (True, False):
        row = raw.guest("g1", whole)
        assert row["migration"] is not None and row["migration"]["id"] == mid, row
        assert row["state"] != "running", row

    def ended() -> bool:
        return all(raw.guest("g1", whole)["migration"]["result"] is not None
                   for whole in (True, False))
    wait_until(ended, 60, "the migration of g1 to end")
    for whole in (True, False):               # moved away, then ready to receive it back
        row = raw.guest("g1", whole)
        assert row["migration"]["result"] == "completed", row
        # migrated-away -> defined -> claimed -> incoming: the re-open is not instant
        wait_until(lambda w=whole: raw.guest("g1", w)["state"] == "incoming", 60,
                   "g1 to be re-opened to receive it back")
    assert [m["id"] for m in raw.status()["finished"]] == [mid]
    assert [m["id"] for m in raw.status("g1")["finished"]] == [mid]
    assert raw.status("g2")["finished"] == []
    assert raw.guest("g2", True)["state"] == "running"
