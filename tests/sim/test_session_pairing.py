"""Pairing by a stable id (issue 10 item 4; docs/architecture.md §1.5): the destination
gives each incoming device's state to its own device with the same id, whatever order its
configuration lists them in; a device that does not pair is a refusal naming it, before
anything is touched."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.support.session_rig import (
    Side,
    SideContainer,
    assert_migrated,
    build_side,
    migrate,
    spec,
)
from vfiod.migration.session.common import SessionConfig
from vfiod.migration.states import MigState

CAP = "v2_precopy_log"
A1 = spec(CAP, "0000:3b:00.1", seed=11)
A2 = spec(CAP, "0000:3c:00.1", seed=12)
B1 = dataclasses.replace(A1, name="0000:81:00.1", seed=61)
B2 = dataclasses.replace(A2, name="0000:82:00.1", seed=62)


@pytest.fixture
def made():
    sides: list[Side] = []
    yield sides
    for s in sides:
        s.close()


def sides(tmp: Path, made: list[Side], src: SideContainer, dst: SideContainer
          ) -> tuple[Side, Side]:
    a = build_side(tmp / "src", "hostA", [src])
    made.append(a)
    b = build_side(tmp / "dst", "hostB", [dst])
    made.append(b)
    return a, b


def test_destination_listing_devices_in_the_other_order_gets_each_its_own_state(
        tmp_path: Path, made: list[Side]) -> None:
    """The finding: with a destination that lists B2 before B1, B1 received A1's state.
    Same kind, other states (seeds): each destination device now holds exactly the
    state of the source device with its id."""
    src, dst = sides(tmp_path, made, SideContainer([A1, A2], ids=["nic0", "nic1"]),
                     SideContainer([B2, B1], ids=["nic1", "nic0"]))
    assert dst.models()[B1.name] != dst.models()[B2.name]
    # what preflight compares per pair: sysfs identity, PCI subsystem ids included
    assert src.guest.device(A1.name).info().identity == {
        "kind": "pci", "driver": A1.driver, "vendor": f"{A1.vendor:#06x}",
        "device": f"{A1.device:#06x}", "subsystem_vendor": f"{A1.vendor:#06x}",
        "subsystem_device": f"{A1.device:#06x}"}
    run = migrate(src, dst)
    sent = run.src_models_at_end
    assert sent[A1.name] != sent[A2.name]
    got = dst.models()
    assert (got[B1.name], got[B2.name]) == (sent[A1.name], sent[A2.name])
    assert_migrated(src, dst, run)
    assert dst.kernel_states() == {B1.name: MigState.RUNNING, B2.name: MigState.RUNNING}


def test_a_device_that_does_not_pair_is_refused_by_id_before_anything_moves(
        tmp_path: Path, made: list[Side]) -> None:
    src, dst = sides(tmp_path, made, SideContainer([A1, A2], ids=["nic0", "nic1"]),
                     SideContainer([B1, B2], ids=["nic0", "gpu0"]))
    src_ram, dst_ram = src.ram_digest(), dst.ram_digest()
    run = migrate(src, dst, SessionConfig(ack_timeout_s=20))
    assert run.source.result == "failed" and run.source.reason.startswith("preflight refused")
    assert run.source.verification["preflight"] == [
        f"device nic1 (source {A2.name}) is not on the destination",
        f"device gpu0 (destination {B2.name}) is not on the source"]
    assert run.dest is not None and run.dest.result == "failed"
    assert src.ram_digest() == src_ram and dst.ram_digest() == dst_ram
    assert dst.models() == dst.initial_models
    assert set(src.kernel_states().values()) == {MigState.RUNNING}


def test_without_ids_devices_of_other_names_are_refused_not_paired(
        tmp_path: Path, made: list[Side]) -> None:
    """No id configured: a device's id is its name, so the hosts' different addresses
    are a named refusal, with the advice to configure ids."""
    src, dst = sides(tmp_path, made, SideContainer([A1], ids=[A1.name]),
                     SideContainer([B1], ids=[B1.name]))
    run = migrate(src, dst, SessionConfig(ack_timeout_s=20))
    reasons = run.source.verification["preflight"]
    assert [r.split(": no id")[0] for r in reasons] == [
        f"device {A1.name} (source {A1.name}) is not on the destination",
        f"device {B1.name} (destination {B1.name}) is not on the source"]
    assert all("no id is configured" in r for r in reasons), reasons
    assert dst.models() == dst.initial_models
