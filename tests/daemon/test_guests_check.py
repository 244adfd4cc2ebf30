"""Guests opened from the configuration on a simulated host, and ``check`` answers for
guests and devices (docs/architecture.md §1 steps 2-4), in-process: a guest that cannot be opened
is kept with its reason, nothing leaks, and the answers name every blocker."""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.service_rig import sim_guests
from vfiod.api.ops import CheckArgs
from vfiod.daemon import check
from vfiod.daemon.config import MigrationConfig, parse_config
from vfiod.daemon.guests import GuestManager
from vfiod.daemon.handlers import DaemonInfo, Handlers
from vfiod.daemon.migrations import MigrationService
from vfiod.daemon.registry import Registry
from vfiod.daemon.simhost import FAULT_LOG_LIMIT, build_sim_host
from vfiod.errors import ConfigError
from vfiod.kernel.sim import SimHost
from vfiod.migration.planning.hostfacts import HostFacts, MemlockFacts, gather_host_facts
from vfiod.vfio import HostPaths

CONFIG = """
[[guest]]
name = "good"
memory = "16MiB"
[[guest.device]]
name = "0000:3b:00.1"
id = "nic0"

[[guest]]
name = "stuck"
memory = "16MiB"
[[guest.device]]
name = "0000:5f:00.0"

[[guest]]
name = "shared"
memory = "16MiB"
memory_encryption = "sev-snp"
[[guest.device]]
name = "0000:61:00.0"

[sim]
[[sim.device]]
name = "0000:3b:00.1"
capability = "v2_precopy"
[[sim.device]]
name = "0000:5f:00.0"
capability = "not_migratable"
[[sim.device]]
name = "0000:61:00.0"
capability = "v2_stop_copy"
group = 30
[[sim.host_device]]
name = "0000:61:00.1"
driver = "ixgbe"
group = 30
[[sim.device]]
name = "0000:70:00.0"
capability = "v2_p2p_log"
"""


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[SimHost, GuestManager, Registry]]:
    with sim_guests(CONFIG, tmp_path) as made:
        yield made


def _facts(host: SimHost, headroom: int | None = None) -> HostFacts:
    mem = MemlockFacts(None, None, 0, True) if headroom is None else \
        MemlockFacts(headroom, headroom, 0, False)
    return dataclasses.replace(gather_host_facts(host.kernel), memlock=mem)


def test_open_states_and_reasons(world: tuple[SimHost, GuestManager, Registry]) -> None:
    host, mgr, reg = world
    good, stuck, shared = (reg.guests[n] for n in ("good", "stuck", "shared"))
    assert good.state == "running" and mgr.opened("good") is not None
    d = good.devices["0000:3b:00.1"]
    assert (d.protocol, d.capabilities, d.state_label, d.tracker, d.migratable) == (
        "v2", ["STOP_COPY", "PRE_COPY"], "RUNNING", "type1", True)
    assert stuck.state == "failed" and mgr.opened("stuck") is None
    assert stuck.error == ("0000:5f:00.0 is not migratable: VFIO_DEVICE_FEATURE MIGRATION: "
                           "ENOTTY and no v1 migration region")
    assert shared.state == "failed"
    assert "bound to host driver ixgbe" in (shared.error or "")
    # Only the good guest holds simulated fds: the failed ones released what they opened.
    files = sorted((f.kind, f.name) for f in host.kernel.open_files().values())
    assert [k for k, _ in files] == ["container", "device", "group"], files
    assert ("device", "0000:3b:00.1") in files
    mgr.close_all()
    assert host.kernel.open_files() == {}
    assert {g.state for g in reg.guests.values()} == {"defined"}      # released


_PLAIN = ["migration link is not authenticated: plain TCP (any host that reaches the "
          "migration port can offer a stream; configure [migration.tls])"]


def test_check_guests(world: tuple[SimHost, GuestManager, Registry]) -> None:
    host, _, reg = world
    r = check.check_guest(reg.guests["good"], _facts(host))
    # No [migration.tls] in these defaults: the one note says the link is unauthenticated.
    assert r["migratable"] and r["blockers"] == [] and r["notes"] == _PLAIN
    r = check.check_guest(reg.guests["stuck"], _facts(host))
    assert not r["migratable"]
    assert any("could not be opened" in b for b in r["blockers"])
    assert "0000:5f:00.0: VFIO_DEVICE_FEATURE MIGRATION: ENOTTY and no v1 migration region" \
        in r["blockers"]
    r = check.check_guest(reg.guests["shared"], _facts(host))
    assert any("AMD SEV-SNP memory encryption" in b for b in r["blockers"])
    r = check.check_guest(reg.guests["good"], _facts(host, headroom=1 << 20))
    assert any("LimitMEMLOCK=infinity" in n for n in r["notes"])


def test_check_names_device_ids_and_notes_a_device_without_one(
        world: tuple[SimHost, GuestManager, Registry]) -> None:
    """A device without ``id`` pairs only by its name: ``check`` says so (a note: the
    migration is refused by name if the hosts differ, never mis-paired)."""
    host, _, reg = world
    r = check.check_guest(reg.guests["good"], _facts(host))
    assert [(d["name"], d["id"]) for d in r["devices"]] == [("0000:3b:00.1", "nic0")]
    r = check.check_guest(reg.guests["shared"], _facts(host))
    assert [(d["name"], d["id"]) for d in r["devices"]] == [("0000:61:00.0", "0000:61:00.0")]
    assert r["notes"] == [
        "0000:61:00.0: no id is configured: a destination pairs this device only with a "
        "device of the same name, and PCI addresses differ between hosts; give it the same "
        "id in both hosts' configurations (a mismatch is a preflight refusal)", *_PLAIN]


def test_check_unowned_devices(world: tuple[SimHost, GuestManager, Registry]) -> None:
    host, mgr, _ = world
    before = len(host.kernel.open_files())
    r = check.probe_unowned(host.kernel, mgr.paths, "0000:70:00.0")
    assert r["migratable"] and r["protocol"] == "v2" and r["dma_logging"] is True
    # the same capability names as a guest's device (one migratability check for both)
    assert r["capabilities"] == ["STOP_COPY", "P2P", "DMA_LOGGING"]
    assert r["tracker"] == "device-logging"
    assert len(host.kernel.open_files()) == before        # the probe closed what it opened
    r = check.probe_unowned(host.kernel, mgr.paths, "0000:61:00.1")
    assert not r["migratable"] and r["blockers"] == ["bound to host driver ixgbe (not ours)"]


def test_opt_out_and_reopen(world: tuple[SimHost, GuestManager, Registry]) -> None:
    _, mgr, reg = world
    good = reg.guests["good"]
    mgr.set_tracking(good, "0000:3b:00.1", False)
    old = mgr.opened("good")
    assert old is not None
    assert old.device("0000:3b:00.1").pre_copy_dirty_page_tracking is False
    mgr.reopen(good, "incoming")
    new = mgr.opened("good")
    assert new is not None and new is not old and good.state == "incoming"
    # The runtime opt-out survives a re-open.
    assert new.device("0000:3b:00.1").pre_copy_dirty_page_tracking is False
    assert new.run_state.name == "INMIGRATE"


def test_the_daemons_sim_host_keeps_a_bounded_fault_log(
        world: tuple[SimHost, GuestManager, Registry]) -> None:
    """README "Limits": the simulated kernel's event log of a daemon's host is capped."""
    host, _, _ = world
    assert host.kernel.faults.log_limit == FAULT_LOG_LIMIT


def test_bad_sim_host_is_a_config_error(tmp_path: Path) -> None:
    cfg = parse_config("[sim]\n[[sim.device]]\nname = \"0000:3b:00.1\"\nkind = \"mdev\"\n"
                       "group = 5\n[[sim.device]]\nname = \"0000:3b:00.2\"\ngroup = 5\n")
    with pytest.raises(ConfigError, match="an mdev must be alone in its group"):
        build_sim_host(cfg.sim, tmp_path)


def test_check_reads_host_facts_outside_the_registry_lock(
        world: tuple[SimHost, GuestManager, Registry]) -> None:
    """Host facts come from /proc and /sys; a slow read must not hold every status up."""
    host, mgr, reg = world
    held: list[bool] = []

    def facts() -> HostFacts:
        # Another thread tries the lock: it fails only if the caller holds it.
        t = threading.Thread(target=lambda: held.append(not _try_lock(reg)))
        t.start()
        t.join(10)
        return _facts(host)

    migrations = MigrationService(reg, mgr, facts, MigrationConfig())
    handlers = Handlers(reg, mgr, migrations, host.kernel,
                        HostPaths(host.sysfs_root, host.dev_root), facts,
                        DaemonInfo("sim", "test.toml", "/run/test.sock"))
    assert handlers.check(CheckArgs("good"))["migratable"]
    assert held == [False]


def _try_lock(reg: Registry) -> bool:
    if not reg.lock.acquire(blocking=False):
        return False
    reg.lock.release()
    return True


def test_concurrent_probes_of_one_unowned_device_all_answer(
        world: tuple[SimHost, GuestManager, Registry]) -> None:
    """``ctl devices`` and ``ctl check DEVICE`` run at once (two requests, two threads of
    the daemon) both probe the device by opening its group, which the kernel lets only one
    open hold: the second must wait for the first, not report the daemon's own probe as
    "open in another process (a VMM owns the device)". Seen in the kernel tier."""
    host, mgr, _ = world
    start = threading.Barrier(8)
    answers: list[dict] = []

    def probe() -> None:
        start.wait()
        for _ in range(10):
            answers.append(check.probe_unowned(host.kernel, mgr.paths, "0000:70:00.0"))

    threads = [threading.Thread(target=probe) for _ in range(8)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)            # interleave the threads as a loaded host would
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(switch)
    assert len(answers) == 80
    assert all(a["migratable"] for a in answers), [a["blockers"] for a in answers
                                                   if not a["migratable"]][:2]


def test_a_released_guest_reads_defined_only_once_its_fds_are_closed(
        world: tuple[SimHost, GuestManager, Registry]) -> None:
    """``defined`` means nothing held: a VMM that polls for it (to take its RAM back) must
    find vfiod's copies closed, so the release is recorded after the guest closes. Seen as
    a race in the attach test: the state read ``defined`` while the memfds were open."""
    host, mgr, reg = world
    for close_by in ("close", "close_all"):
        guest = mgr.opened("good")
        assert guest is not None
        seen: list[str] = []
        real_close = guest.close

        def close_and_look(real_close=real_close, seen=seen) -> None:
            seen.append(reg.guests["good"].state)
            real_close()
        guest.close = close_and_look                       # type: ignore[method-assign]
        if close_by == "close":
            mgr.close(reg.guests["good"], "test")
        else:
            mgr.close_all()
        assert seen == ["running"], (close_by, seen)
        assert reg.guests["good"].state == "defined"
        assert not any(f.name == "0000:3b:00.1" for f in host.kernel.open_files().values())
        if close_by == "close":
            mgr.open(reg.guests["good"], "running")


def test_a_release_the_lifecycle_refuses_closes_nothing_and_still_ends_the_record(
        world: tuple[SimHost, GuestManager, Registry]) -> None:
    """A migration's end hands ``close`` its lifecycle steps to ``defined`` (the record's
    end with them): refused (here, from migrating-out), they still run, so the record
    ends, and the guest keeps its fds."""
    from vfiod.daemon.lifecycle import LifecycleError, LifecycleState
    host, mgr, reg = world
    reg.lifecycle.move("good", LifecycleState.MIGRATING_OUT, "test")
    ran: list[str] = []

    def steps() -> None:
        ran.append("record ended")
        reg.lifecycle.move("good", LifecycleState.DEFINED, "test")
    with pytest.raises(LifecycleError):
        mgr.close(reg.guests["good"], "test", steps)
    assert ran == ["record ended"]
    assert mgr.opened("good") is not None
    assert any(f.name == "0000:3b:00.1" for f in host.kernel.open_files().values())
