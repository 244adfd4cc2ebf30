"""An in-process migration service over a registry with one running guest "g1", no kernel
(docs/architecture.md §6: the daemon's migration service and the guest lifecycle)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vfiod.daemon.config import GuestConfig, MigrationConfig, RamConfig
from vfiod.daemon.lifecycle import LifecycleState
from vfiod.daemon.migrations import MigrationService
from vfiod.daemon.registry import Registry


@contextmanager
def running_guest_service(guests: Any) -> Iterator[tuple[Registry, MigrationService]]:
    """(registry, service) with g1 running; ``guests`` stands in for the guest manager.
    The service is shut down afterwards."""
    reg = Registry()
    reg.add_guest(GuestConfig("g1", (RamConfig("ram0", 0, 1 << 20),)))
    reg.lifecycle.move("g1", LifecycleState.CLAIMED, "test")
    reg.lifecycle.move("g1", LifecycleState.RUNNING, "test")
    svc = MigrationService(reg, guests, facts=lambda: None,  # type: ignore[arg-type]
                           defaults=MigrationConfig())
    try:
        yield reg, svc
    finally:
        svc.shutdown(timeout_s=30)
