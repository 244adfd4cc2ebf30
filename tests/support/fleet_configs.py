"""Configurations of simulated hosts with many guests (the load test and benchmarks,
README "Limits"): ``fleet_config(side, guests, devices)`` gives ``guests`` guests
(``f00``, ``f01``, ...) with ``devices`` devices each, one container per guest, every
device a v2 device with PRE_COPY, P2P and DMA logging in the ``[sim]`` section.

As in ``daemon_configs.py``, a destination host has the same guests as
``start = "incoming"`` with its own PCI addresses (bus 0x90 + guest instead of 0x10 +
guest), the same capability sets and device ids (``fn0`` ...), and a listener on an
ephemeral loopback port.
"""

from __future__ import annotations

CAPABILITY = "v2_precopy_p2p_log"


def fleet_guest(i: int) -> str:
    return f"f{i:02d}"


def fleet_device(side: str, guest: int, device: int) -> str:
    bus = (0x90 if side == "destination" else 0x10) + guest
    return f"0000:{bus:02x}:00.{device}"


def fleet_config(side: str, guests: int, devices: int, *, memory: str = "8MiB",
                 dirty_rate: str = "", fill: str = "", migration: str = "") -> str:
    """``side``: "source" or "destination". ``dirty_rate``/``fill``: a sim workload on
    every source guest (none when empty). ``devices`` is at most 8 (PCI functions)."""
    if not 1 <= devices <= 8 or not 1 <= guests <= 0x60:
        raise ValueError(f"fleet of {guests} guests x {devices} devices is out of range")
    start = "incoming" if side == "destination" else "running"
    text = "[migration]\n" + migration
    if side == "destination":
        text += 'listen = "127.0.0.1:0"\n'
    sim = "\n[sim]\n"
    for g in range(guests):
        text += f'\n[[guest]]\nname = "{fleet_guest(g)}"\nmemory = "{memory}"\nstart = "{start}"\n'
        for d in range(devices):
            name = fleet_device(side, g, d)
            text += f'[[guest.device]]\nname = "{name}"\nid = "fn{d}"\n'
            sim += f'[[sim.device]]\nname = "{name}"\ncapability = "{CAPABILITY}"\n'
        if side == "source" and dirty_rate:
            sim += (f'[[sim.workload]]\nguest = "{fleet_guest(g)}"\ndirty_rate = "{dirty_rate}"\n'
                    f'fill = "{fill or "0"}"\n')
    return text + sim
