"""The status vocabulary: the triple in the seed's flow-diagram words (docs/architecture.md §1)."""

from __future__ import annotations

import pytest

from vfiod.abi.vfio import vfio_device_mig_state
from vfiod.migration.session.status import triple
from vfiod.migration.states import GuestState, MigrationState, MigState, device_label


def test_one_enum() -> None:
    assert MigState is vfio_device_mig_state


@pytest.mark.parametrize("state,label", [
    (MigState.PRE_COPY, "RUNNING|SAVING"),
    (MigState.STOP_COPY, "SAVING"),
    (MigState.STOP, "STOP"),
    (MigState.RESUMING, "RESUMING"),
    (MigState.RUNNING, "RUNNING"),
    (MigState.ERROR, "ERROR"),
    (MigState.RUNNING_P2P, "RUNNING_P2P"),
    (MigState.PRE_COPY_P2P, "RUNNING_P2P|SAVING"),
    (None, "-"),
])
def test_device_labels(state: MigState | None, label: str) -> None:
    assert device_label(state) == label


def test_every_state_has_a_label() -> None:
    assert len({device_label(s) for s in MigState}) == len(MigState)


def test_triple() -> None:
    assert triple(GuestState.RUNNING, MigrationState.ACTIVE, [MigState.PRE_COPY]) \
        == "(RUNNING, ACTIVE, RUNNING|SAVING)"
    assert triple(GuestState.FINISH_MIGRATE, MigrationState.DEVICE, [MigState(3)]) \
        == "(FINISH_MIGRATE, DEVICE, SAVING)"
    assert triple(None, MigrationState.NONE, [None]) == "(-, NONE, -)"


def test_unknown_device_value_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="9 is not a vfio_device_mig_state value"):
        device_label(9)


def test_migration_state_finished() -> None:
    assert {s for s in MigrationState if s.finished} == {
        MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.CANCELLED}
