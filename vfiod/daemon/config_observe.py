"""The ``[[observe]]`` tables of the daemon configuration: devices another VMM owns and
migrates itself, whose migration state vfiod only reports (docs/architecture.md §8.5).

    [[observe]]
    device = "0000:3b:00.2"              # PCI address (or mdev UUID) as debugfs names it
    owner = "vm7"                        # optional: who owns it, shown in status

Top-level, not under a ``[[guest]]``: a guest is what vfiod opens and migrates, and an
observed device is part of none of vfiod's guests. A device may be observed once, and not
while it is one of vfiod's own guest devices (vfiod would then touch it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vfiod.daemon.config_toml import DEVICE_NAME, NAME, Table


@dataclass(frozen=True)
class ObserveConfig:
    device: str
    owner: str | None = None


def parse_observe(tables: Sequence[Table]) -> tuple[ObserveConfig, ...]:
    out: list[ObserveConfig] = []
    for t in tables:
        device = str(t.string("device", required=True, pattern=DEVICE_NAME,
                              hint="a PCI address (0000:3b:00.2) or an mdev UUID"))
        owner = t.string("owner", pattern=NAME,
                         hint="letters, digits and '_.+-', at most 64 (e.g. the VM's name)")
        t.finish()
        if any(o.device == device for o in out):
            raise t.error("device", f"device {device} is observed twice")
        out.append(ObserveConfig(device, owner))
    return tuple(out)


def check_observe(observed: Sequence[ObserveConfig], tables: Sequence[Table],
                  guest_devices: dict[str, str]) -> None:
    """Refuse an observed device that one of vfiod's guests uses (``guest_devices``:
    device name -> guest): vfiod opens and migrates those, so it cannot leave them be."""
    for o, t in zip(observed, tables, strict=True):
        guest = guest_devices.get(o.device)
        if guest is not None:
            raise t.error("device", f"device {o.device} is a device of guest {guest}, "
                          "which vfiod opens and migrates itself; an observed device "
                          "belongs to another VMM: remove it from one of the two")
