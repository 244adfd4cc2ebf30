"""Configurations of the simulated hosts the daemon tests run (``[sim]`` sections).

A source host runs guests; a destination host is configured with the same guests as
``start = "incoming"``, with its own device names (PCI addresses differ between hosts) of
the same capability sets and the same device ids (``nic0`` ...), which migrations pair
devices by.
"""

from __future__ import annotations

SOURCE_DEVICES = {"g1": ["0000:3b:00.1", "0000:3c:00.0"], "g2": ["0000:3d:00.1"]}
DEST_DEVICES = {"g1": ["0000:81:00.1", "0000:82:00.0"], "g2": ["0000:83:00.1"]}
#: g2's device has no DMA logging: its container falls back to type1, which reports every
#: mapped page dirty at every sync (a PCI device behind a real IOMMU), so its pre-copy can
#: never converge under a bandwidth cap: it stays in pre-copy until cancelled (or until
#: the policy gives up on it, after at least 30 s).
CAPS = {"g1": ["v2_precopy_p2p_log", "v2_stop_copy_log"], "g2": ["v2_precopy"]}


def _guest(name: str, devices: list[str], start: str, opt_out: str | None,
           reverse: bool = False) -> str:
    out = f'''
[[guest]]
name = "{name}"
start = "{start}"
[[guest.ram]]
name = "ram"
size = "56MiB"
[[guest.ram]]
name = "pool"
gpa = "56MiB"
size = "8MiB"
'''
    listed = list(enumerate(devices))
    for i, dev in reversed(listed) if reverse else listed:
        container = "c1" if i == 1 else "c0"
        out += (f'[[guest.device]]\nname = "{dev}"\nid = "nic{i}"\n'
                f'container = "{container}"\n')
        if dev == opt_out:
            out += "pre_copy_dirty_page_tracking = false\n"
    if len(devices) > 1:
        # The second device DMAs only into the pool: its container maps just that.
        out += '[[guest.container]]\nname = "c1"\nmap = ["pool"]\n'
    return out


def host_config(side: str, *, guests: tuple[str, ...] = ("g1",), extra_sim: str = "",
                migration: str = "", workloads: dict[str, tuple[str, str]] | None = None,
                reversed_devices: tuple[str, ...] = ()) -> str:
    """``side``: "source" (guests run) or "destination" (guests incoming, listener on an
    ephemeral loopback port). ``workloads``: guest -> (dirty_rate, fill) on the source.
    ``reversed_devices``: guests whose ``[[guest.device]]`` tables are listed last first
    (each with its own id and container)."""
    devices = SOURCE_DEVICES if side == "source" else DEST_DEVICES
    start = "running" if side == "source" else "incoming"
    text = "[migration]\n" + migration
    if side == "destination":
        text += 'listen = "127.0.0.1:0"\n'
    for g in guests:
        opt = devices[g][1] if len(devices[g]) > 1 else None
        text += _guest(g, devices[g], start, opt, g in reversed_devices)
    text += "\n[sim]\n"
    for g in guests:
        for dev, cap in zip(devices[g], CAPS[g], strict=True):
            text += f'[[sim.device]]\nname = "{dev}"\ncapability = "{cap}"\n'
    text += extra_sim
    for g, (rate, fill) in (workloads or {}).items():
        if side == "source":
            text += f'[[sim.workload]]\nguest = "{g}"\ndirty_rate = "{rate}"\nfill = "{fill}"\n'
    return text


#: Devices no guest owns, to show "not ours" and "not migratable" answers.
UNOWNED = '''
[[sim.device]]
name = "0000:5f:00.0"
capability = "not_migratable"
[[sim.device]]
name = "0000:5e:00.0"
capability = "v1"
[[sim.host_device]]
name = "0000:60:00.0"
driver = "ixgbe"
'''
