"""A migration the daemon cancels because it is stopping (SIGTERM, systemctl stop) says
so; only ``vfiod ctl cancel`` is reported as the operator's cancel (daemon/ledger.py,
daemon/migrations.py). In-process: a registry, the migration service, a stand-in
session that records the reason it was cancelled with."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.service_rig import running_guest_service
from vfiod.daemon.ledger import CANCEL_REASON, SHUTDOWN_REASON
from vfiod.daemon.lifecycle import LifecycleState
from vfiod.daemon.migrations import MigrationService
from vfiod.daemon.registry import Registry

S = LifecycleState


class RecordingSession:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.by: list[str] = []

    def cancel(self, reason: str, by: str = "operator") -> bool:
        self.reasons.append(reason)
        self.by.append(by)
        return True


@pytest.fixture
def service() -> Iterator[tuple[Registry, MigrationService]]:
    with running_guest_service(object()) as made:
        yield made


def _running(reg: Registry, svc: MigrationService) -> Any:
    with reg.lock:
        _, handle = svc.ledger.begin("g1", "source", "10.0.0.2:4444",
                                     moves=[(S.MIGRATING_OUT, "test")])
    return handle


def test_shutdown_cancels_as_shutdown(service: tuple[Registry, MigrationService]) -> None:
    reg, svc = service
    session = RecordingSession()
    _running(reg, svc).attach(session)
    svc.shutdown(timeout_s=30)
    assert session.reasons == [SHUTDOWN_REASON] and session.by == ["shutdown"]
    assert "shutting down" in SHUTDOWN_REASON and "operator" not in SHUTDOWN_REASON


def test_shutdown_before_the_session_exists_keeps_its_reason(
        service: tuple[Registry, MigrationService]) -> None:
    reg, svc = service
    handle = _running(reg, svc)
    svc.shutdown(timeout_s=30)                 # while it is still connecting
    session = RecordingSession()
    handle.attach(session)
    assert session.reasons == [SHUTDOWN_REASON] and handle.reason == SHUTDOWN_REASON


def test_ctl_cancel_is_the_operators(service: tuple[Registry, MigrationService]) -> None:
    reg, svc = service
    session = RecordingSession()
    _running(reg, svc).attach(session)
    entry = reg.guest("g1")
    assert entry is not None
    assert svc.ledger.cancel(entry) is not None
    assert session.reasons == [CANCEL_REASON] and session.by == ["operator"]
