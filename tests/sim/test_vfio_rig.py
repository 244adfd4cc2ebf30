"""A check of the vfio-layer rig itself (tests/support/vfio_rig.py): the simulated host
has the documented groups, and only VFIO-bound groups get a /dev/vfio node."""

from __future__ import annotations

from pathlib import Path

from tests.support.vfio_rig import Rig, rig_fixture  # noqa: F401  (rig_fixture: the rig fixture)


def test_rig_builds_the_documented_topology(rig: Rig) -> None:
    assert sorted(rig.host.groups) == [10, 11, 12, 13, 14]
    assert not (Path(rig.paths.dev_root) / "vfio" / "12").exists()
    assert (Path(rig.paths.dev_root) / "vfio" / "10").exists()
