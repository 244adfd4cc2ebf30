"""In-process daemon parts without a daemon process (docs/architecture.md §6): a migration
service over a registry with one running guest "g1" and no kernel, and a config's guests
opened on its simulated host as the daemon opens them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vfiod.daemon.config import GuestConfig, MigrationConfig, RamConfig, parse_config
from vfiod.daemon.guests import GuestManager
from vfiod.daemon.lifecycle import LifecycleState
from vfiod.daemon.migrations import MigrationService
from vfiod.daemon.registry import Registry
from vfiod.daemon.simhost import build_sim_host
from vfiod.kernel.sim import SimHost
from vfiod.vfio import HostPaths


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


@contextmanager
def sim_guests(config_text: str, root: Path) -> Iterator[tuple[SimHost, GuestManager, Registry]]:
    """The guests of ``config_text`` opened on its simulated host (under ``root``), as the
    daemon opens them; closed afterwards."""
    cfg = parse_config(config_text)
    host = build_sim_host(cfg.sim, root)
    reg = Registry()
    mgr = GuestManager(host.kernel, HostPaths(host.sysfs_root, host.dev_root), reg)
    try:
        mgr.open_all(cfg.guests)
        yield host, mgr, reg
    finally:
        mgr.close_all()
        host.close()
