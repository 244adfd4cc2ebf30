"""``ctl check GUEST`` gives a predicted downtime and a verdict with its reasons
(docs/architecture.md §4), in-process on a simulated host: an opt-out in the shared
container, a device with no dirty tracking, device state too large for the limit at the
link's bandwidth, and a guest that converges. The last two of the first three are not
"migratable": the opted-out RAM is named with its worst case, and counted as the
migration samples it."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.support.service_rig import sim_guests
from vfiod.cli import ctl_cmd
from vfiod.daemon import check
from vfiod.daemon.config import MigrationConfig
from vfiod.daemon.guests import GuestManager
from vfiod.daemon.registry import Registry
from vfiod.migration.planning.hostfacts import HostFacts, MemlockFacts, gather_host_facts

MiB = 1 << 20

CONFIG = """
[[guest]]
name = "optout"
memory = "64MiB"
[[guest.device]]
name = "0000:3b:00.1"
[[guest.device]]
name = "0000:3c:00.0"
pre_copy_dirty_page_tracking = false

[[guest]]
name = "untracked"
memory = "64MiB"
[[guest.device]]
name = "0000:3d:00.1"

[[guest]]
name = "bigstate"
memory = "64MiB"
[[guest.device]]
name = "0000:3e:00.0"

[[guest]]
name = "fine"
memory = "64MiB"
[[guest.device]]
name = "0000:3f:00.0"

[sim]
[[sim.device]]
name = "0000:3b:00.1"
capability = "v2_precopy_log"
[[sim.device]]
name = "0000:3c:00.0"
capability = "v2_stop_copy_log"
[[sim.device]]
name = "0000:3d:00.1"
capability = "v2_precopy"
[[sim.device]]
name = "0000:3e:00.0"
capability = "v2_stop_copy_log"
state_size = "96MiB"
[[sim.device]]
name = "0000:3f:00.0"
capability = "v2_precopy_log"
"""


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[GuestManager, Registry, HostFacts]]:
    with sim_guests(CONFIG, tmp_path) as (host, mgr, reg):
        yield mgr, reg, dataclasses.replace(gather_host_facts(host.kernel),
                                            memlock=MemlockFacts(None, None, 0, True))


def _check(world: tuple[GuestManager, Registry, HostFacts], name: str,
           bandwidth: int | None = None) -> dict[str, Any]:
    mgr, reg, facts = world
    return check.check_guest(reg.guests[name], facts,
                             defaults=MigrationConfig(bandwidth_limit=bandwidth),
                             guest=mgr.opened(name))


def _text(r: dict[str, Any]) -> str:
    class Client:
        def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
            return r
    out = io.StringIO()
    code = ctl_cmd._check(Client(), SimpleNamespace(target=r["target"], json=False), out)  # type: ignore[arg-type]
    return f"exit {code}\n{out.getvalue()}"


def test_opt_out_in_the_shared_container(world) -> None:
    """The migration samples what the opted-out device writes; the check names the RAM
    and its worst case, and does not refuse on it."""
    r = _check(world, "optout", 32 * MiB)
    o = r["outlook"]
    assert (r["migratable"], o["verdict"]) == (True, "converges"), o
    assert (o["always_dirty_bytes"], o["opted_out_bytes"]) == (0, 64 * MiB)
    assert any(x.startswith("0000:3c:00.0: pre-copy dirty tracking is off (opt-out): the 64 "
                            "MiB of RAM its shared container maps is not queried until "
                            "stop-and-copy; the migration counts the part a sample of it "
                            "shows written (if its devices wrote all of it: 20")
               for x in o["reasons"]), o["reasons"]
    assert o["predicted_downtime_ms"] < 300
    assert _text(r).startswith("exit 0\nguest optout: converges (predicted downtime ")


def test_no_dirty_tracking_at_all(world) -> None:
    r = _check(world, "untracked", 32 * MiB)
    o = r["outlook"]
    assert (r["migratable"], o["verdict"]) == (False, "will not converge"), o
    assert "0000:3d:00.1: its container has no dirty-page tracking: all 64 MiB it maps are " \
        "dirty at every pass" in o["reasons"]
    assert "can migrate" not in _text(r)


def test_device_state_too_large_for_the_link(world) -> None:
    r = _check(world, "bigstate", 16 * MiB)
    o = r["outlook"]
    assert (r["migratable"], o["verdict"]) == (False, "will not converge"), o
    assert o["device_state_bytes"] >= 96 * MiB        # the driver's MIG_DATA_SIZE
    assert any(w.startswith("0000:3e:00.0: its 96 MiB of device state alone take 60")
               and w.endswith("ms at 16.0 MiB/s: too large for the 300 ms limit")
               for w in o["reasons"]), o["reasons"]
    assert o["bandwidth_source"] == "the configured bandwidth_limit"


def test_a_guest_that_converges_and_the_default_bandwidth(world) -> None:
    r = _check(world, "fine")
    o = r["outlook"]
    assert (r["migratable"], o["verdict"]) == (True, "converges"), o
    assert o["bandwidth_source"] == "the 1 Gb/s default: link speed unknown"
    assert o["predicted_downtime_ms"] < 300
    assert _text(r).startswith("exit 0\nguest fine: converges (predicted downtime ")


def test_force_on_give_up_makes_it_converge_only_when_forced(world) -> None:
    mgr, reg, facts = world
    r = check.check_guest(reg.guests["untracked"], facts, guest=mgr.opened("untracked"),
                          defaults=MigrationConfig(bandwidth_limit=32 * MiB,
                                                   on_timeout="force"))
    assert r["migratable"] and r["outlook"]["verdict"] == \
        "converges only with a forced switchover"
