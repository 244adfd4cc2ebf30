"""A check of the session rig itself (tests/support/session_rig.py): the guest it builds
holds its devices, and filled RAM digests differently from empty RAM."""

from __future__ import annotations

from pathlib import Path

from tests.support.session_rig import MiB, SideContainer, build_side, spec
from vfiod.migration.states import MigState


def test_rig_builds_a_guest_with_filled_ram(tmp_path: Path) -> None:
    side = build_side(tmp_path, "h", [SideContainer([spec("v2_precopy_log")])],
                      fill_bytes=1 * MiB)
    try:
        assert [d.name for d in side.guest.devices] == ["0000:3e:00.1"]
        empty = build_side(tmp_path / "e", "h", [SideContainer([spec("v2_precopy_log")])])
        try:
            assert side.ram_digest() != empty.ram_digest()
        finally:
            empty.close()
        assert side.kernel_states() == {"0000:3e:00.1": MigState.RUNNING}
    finally:
        side.close()
