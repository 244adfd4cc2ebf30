"""What the migration service does to a source guest's lifecycle when a migration ends
without running a session (docs/architecture.md §1 step 6): an unreachable destination gives the
guest back (running), a crash in the migration thread fails it, and a migration that
outlives the shutdown deadline fails it so that it can be released. In-process: a
registry, a stand-in for the guest manager, no kernel."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.service_rig import running_guest_service
from vfiod.daemon import migrations
from vfiod.daemon.lifecycle import LifecycleState
from vfiod.daemon.migrations import MigrationService
from vfiod.daemon.registry import Registry

S = LifecycleState


class OpenGuests:
    """The one thing the service asks the guest manager before a session: the open guest."""

    def opened(self, name: str) -> Any:
        return object()


@pytest.fixture
def service() -> Iterator[tuple[Registry, MigrationService]]:
    with running_guest_service(OpenGuests()) as made:
        yield made


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])        # nothing listens there once closed


def _migrate(reg: Registry, svc: MigrationService, port: int) -> None:
    entry = reg.guest("g1")
    assert entry is not None
    with reg.lock:
        svc.start_outgoing(entry, "127.0.0.1", port, downtime_limit_ms=None, timeout_s=None,
                           on_timeout=None)
        assert entry.state is S.MIGRATING_OUT


def test_unreachable_destination_gives_the_guest_back(
        service: tuple[Registry, MigrationService]) -> None:
    reg, svc = service
    _migrate(reg, svc, _closed_port())
    svc.shutdown(timeout_s=30)                 # waits for the migration thread
    g = reg.snapshot()["guests"][0]
    assert g["state"] == "running" and g["migration"]["result"] == "failed"
    assert g["migration"]["error"].startswith("cannot reach the destination")


def test_a_crash_in_the_migration_thread_fails_the_guest(
        service: tuple[Registry, MigrationService], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("wiring bug")
    monkeypatch.setattr(migrations, "connect_allowed", broken)
    reg, svc = service
    _migrate(reg, svc, 1)
    svc.shutdown(timeout_s=30)
    g = reg.snapshot()["guests"][0]
    assert (g["state"], g["error"]) == ("failed", "internal error: RuntimeError: wiring bug")
    assert g["migration"]["result"] == "failed"


def test_a_migration_outliving_shutdown_fails_its_guest(
        service: tuple[Registry, MigrationService], monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def stuck(*args: Any, **kw: Any) -> Any:
        release.wait(60)
        raise ConnectionRefusedError("released by the test")
    monkeypatch.setattr(migrations, "connect_allowed", stuck)
    reg, svc = service
    _migrate(reg, svc, 1)
    try:
        svc.shutdown(timeout_s=0.05)           # the deadline passes with the thread stuck
        entry = reg.guest("g1")
        assert entry is not None and entry.state is S.FAILED
        assert entry.error == "its migration did not end within the 0.05 s shutdown deadline"
        assert reg.lifecycle.release("g1", "the daemon is stopping") is not None
    finally:
        release.set()
