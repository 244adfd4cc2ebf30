"""A check of the dirty-tracking rig itself (tests/support/dirty_rig.py): a DMA write is
remembered at the guest page the mapping puts it on."""

from __future__ import annotations

from pathlib import Path

from tests.support.dirty_rig import GUEST_PAGE, Rig, dev


def test_rig_maps_and_writes(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [[dev("3f2504e0-4f89-11d3-9a0c-0305e82c3301", kind="mdev")]])
    try:
        rig.type1("c0", [10])
        rig.map("c0", 0x10000, 37 * GUEST_PAGE, 8 * GUEST_PAGE)
        rig.write("3f2504e0-4f89-11d3-9a0c-0305e82c3301", "c0", 0x10000 + GUEST_PAGE + 5, 10)
        assert rig.written == {38}
    finally:
        rig.close()
