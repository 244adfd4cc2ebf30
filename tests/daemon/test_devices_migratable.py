"""``vfiod devices --json`` gives every device a ``migratable`` field and, when it is
false, ``migratable_reason`` (the same answer ``vfiod ctl check DEVICE`` gives: probed
on the spot for a device no guest owns; daemon/check.py). On the simulated host of
``vfiod devices --sim``: the device without migration support says why (ENOTTY, no v1
region), a device bound to a host driver says that, and the migratable ones have no
reason."""

from __future__ import annotations

import json

import pytest

from vfiod.cli.main import main


def test_vfiod_devices_json_says_which_can_migrate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--sim", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for r in rows.values():
        assert isinstance(r["migratable"], bool), r
        assert (r["migratable_reason"] is None) == r["migratable"], r
    assert rows["0000:40:00.0"]["migratable"] is False            # the not-migratable spec
    assert "ENOTTY and no v1 migration region" in rows["0000:40:00.0"]["migratable_reason"]
    assert rows["0000:00:1f.6"]["migratable_reason"] == \
        "bound to host driver e1000e (not ours)"
    assert rows["0000:3c:00.0"]["migratable"] is True
    assert rows["6c4e8e12-0b1a-4d1e-9d4f-2b7a3c5e0a11"]["migratable"] is True   # v1 vGPU


def test_vfiod_devices_table_has_the_column(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--sim"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "MIGRATABLE" in lines[0]
    (nm,) = [ln for ln in lines if ln.startswith("0000:40:00.0")]
    assert nm.split()[5:8] == ["yes", "no", "VFIO_DEVICE_FEATURE"], nm
    assert "ENOTTY and no v1 migration region" in nm
