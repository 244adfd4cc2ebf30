"""v1 device_state bitmask ⇄ MigState (docs/kernel-contract.md §5.3) and the register layout (§5.2)."""

from __future__ import annotations

import random

import pytest

from vfiod.abi.v1 import V1_STATE_MASK, vfio_device_migration_info
from vfiod.migration.device import v1_codec
from vfiod.migration.states import MigState

# The table from the uAPI header, written out independently of the codec.
TABLE = {
    0b000: MigState.STOP,
    0b001: MigState.RUNNING,
    0b010: MigState.STOP_COPY,
    0b011: MigState.PRE_COPY,
    0b100: MigState.RESUMING,
    0b110: MigState.ERROR,
}


@pytest.mark.parametrize("bits,state", sorted(TABLE.items()), ids=lambda x: str(x))
def test_encode_decode_table(bits: int, state: MigState) -> None:
    assert v1_codec.encode(state) == bits
    assert v1_codec.decode(bits) is state


@pytest.mark.parametrize("bits,names", [(0b101, "RESUMING|RUNNING"),
                                        (0b111, "RESUMING|SAVING|RUNNING")])
def test_invalid_combinations_name_the_bits(bits: int, names: str) -> None:
    with pytest.raises(ValueError) as ei:
        v1_codec.decode(bits)
    msg = str(ei.value)
    assert f"0b{bits:03b}" in msg and names in msg and "invalid" in msg


@pytest.mark.parametrize("state", [MigState.RUNNING_P2P, MigState.PRE_COPY_P2P, 8, -1])
def test_states_without_v1_form_are_refused(state: object) -> None:
    with pytest.raises(ValueError, match="no v1 device_state encoding"):
        v1_codec.encode(state)  # type: ignore[arg-type]


def test_reserved_bits_survive_read_modify_write() -> None:
    rng = random.Random(7)
    for _ in range(500):
        reserved = rng.getrandbits(32) & ~V1_STATE_MASK
        old = reserved | rng.choice(list(TABLE))
        target = rng.choice(list(TABLE.values()))
        new = v1_codec.with_state(old, target)
        assert new & ~V1_STATE_MASK & 0xFFFFFFFF == reserved
        assert v1_codec.state_of(new) is target
        assert 0 <= new <= 0xFFFFFFFF


def test_decode_ignores_reserved_bits() -> None:
    assert v1_codec.decode(0xFFFFFFF8 | 0b011) is MigState.PRE_COPY


def test_with_state_refuses_a_non_32_bit_register() -> None:
    with pytest.raises(ValueError, match="32-bit"):
        v1_codec.with_state(1 << 32, MigState.RUNNING)
    with pytest.raises(ValueError, match="32-bit"):
        v1_codec.with_state(-1, MigState.RUNNING)


def test_field_layout_matches_the_struct() -> None:
    expect = {"device_state": (0, 4), "pending_bytes": (8, 8), "data_offset": (16, 8),
              "data_size": (24, 8)}
    got = {n: (f.offset, f.size) for n, f in v1_codec.FIELDS.items()}
    assert got == expect
    for name, (off, size) in expect.items():
        desc = getattr(vfio_device_migration_info, name)
        assert (desc.offset, desc.size) == (off, size)


def test_field_pack_unpack_and_bounds() -> None:
    assert v1_codec.unpack_field("pending_bytes", v1_codec.pack_field("pending_bytes", 1 << 40)) \
        == 1 << 40
    assert len(v1_codec.pack_field("device_state", 3)) == 4
    with pytest.raises(ValueError, match="does not fit 4 bytes"):
        v1_codec.pack_field("device_state", 1 << 32)
    with pytest.raises(ValueError, match="expected 8 bytes, got 4"):
        v1_codec.unpack_field("data_size", b"\0" * 4)
