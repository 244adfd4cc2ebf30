"""``[[observe]]`` in the configuration (vfiod/daemon/config_observe.py,
docs/architecture.md §8.5): devices another VMM owns, validated like the rest of the file,
and reading them on demand with a short shared cache (vfiod/daemon/observe.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.support.sim_mig_rig import specs
from vfiod.daemon.config import parse_config
from vfiod.daemon.config_observe import ObserveConfig
from vfiod.daemon.observe import ObservedDevices
from vfiod.errors import ConfigError
from vfiod.kernel.sim import SimHost

GUEST = """
[[guest]]
name = "g1"
memory = "64MiB"
[[guest.device]]
name = "0000:3b:00.1"
"""


def _parse(text: str):  # noqa: ANN202
    return parse_config(text, "vfiod.toml", host_memory=1 << 34)


def test_observed_devices_are_read_in_order_with_their_owner() -> None:
    cfg = _parse(GUEST + '[[observe]]\ndevice = "0000:3b:00.2"\nowner = "vm7"\n'
                 '[[observe]]\ndevice = "6c4e8e12-0b1a-4d1e-9d4f-2b7a3c5e0a11"\n'
                 '[sim]\ndebugfs = "no-vfio"\n')
    assert cfg.observe == (ObserveConfig("0000:3b:00.2", "vm7"),
                           ObserveConfig("6c4e8e12-0b1a-4d1e-9d4f-2b7a3c5e0a11", None))
    assert cfg.sim.debugfs == "no-vfio"
    assert _parse(GUEST).observe == ()


@pytest.mark.parametrize("text,where", [
    ('[[observe]]\nowner = "vm7"\n', r"vfiod\.toml:\d+: observe\[0\]\.device: is required"),
    ('[[observe]]\ndevice = "../../etc"\n', r"observe\[0\]\.device: '\.\./\.\./etc' is not valid"),
    ('[[observe]]\ndevice = "0000:3b:00.2"\nowner = "vm 7"\n', r"observe\[0\]\.owner"),
    ('[[observe]]\ndevice = "0000:3b:00.2"\nmode = "rw"\n', r"unknown key 'mode'"),
    ('[[observe]]\ndevice = "0000:3b:00.2"\n[[observe]]\ndevice = "0000:3b:00.2"\n',
     r"vfiod\.toml:10: observe\[1\]\.device: device 0000:3b:00\.2 is observed twice"),
    ('[[observe]]\ndevice = "0000:3b:00.1"\n',
     r"vfiod\.toml:8: observe\[0\]\.device: device 0000:3b:00\.1 is a device of guest g1"),
    ('[observe]\ndevice = "0000:3b:00.2"\n', r"observe: must be an array of tables"),
    ('[sim]\ndebugfs = "sometimes"\n', r"sim\.debugfs: must be one of"),
])
def test_a_bad_observe_table_is_refused_naming_line_and_key(text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        _parse(GUEST + text)


def test_readings_are_shared_for_max_age_then_read_again(tmp_path: Path) -> None:
    host = SimHost.build(tmp_path, [[dataclasses.replace(specs()["v2_p2p"],
                                                         name="0000:3b:00.2")]])
    now = [100.0]
    obs = ObservedDevices([ObserveConfig("0000:3b:00.2")], host.kernel, max_age_s=1.0,
                          clock=lambda: now[0], wall_clock=lambda: 1_700_000_000.0)
    first = obs.rows()
    now[0] += 0.4
    second = obs.rows()
    assert host.kernel.debugfs.reads == 1
    assert first[0]["age_s"] == 0.0 and second[0]["age_s"] == pytest.approx(0.4)
    assert second[0]["read_at"] == 1_700_000_000.0 and second[0]["state"] == "RUNNING"
    now[0] += 0.6
    obs.rows()
    assert host.kernel.debugfs.reads == 2
    obs.replace([ObserveConfig("0000:3b:00.9", "vm9")])      # a reload reads at once
    row = obs.rows()[0]
    assert (row["device"], row["owner"], row["problem"]) == ("0000:3b:00.9", "vm9",
                                                              "no-device")
