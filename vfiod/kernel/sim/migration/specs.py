"""Named capability sets of simulated devices, for tests and demos (docs/kernel-contract.md §5, §6.2,
§7, §9): one ``DeviceSpec`` per way a real device can offer migration.

    specs = capability_specs()
    specs["v2_precopy_p2p_log"]      # STOP_COPY|P2P|PRE_COPY + DMA logging (mlx5-like)

Names: ``v1``; ``v2_stop_copy`` (hisi-like), ``v2_p2p`` (pds-like), ``v2_precopy``,
``v2_precopy_p2p`` (mlx5/mtty-like); each also with ``_log`` (device DMA logging);
and ``not_migratable`` (no migration at all). Every spec has its own BDF; make a
same-kind destination with ``dataclasses.replace(spec, name=...)``.
"""

from __future__ import annotations

import dataclasses

import vfiod.abi.vfio as v
from vfiod.kernel.sim.interfaces import DeviceSpec

_SC, _P2P, _PRE = v.VFIO_MIGRATION_STOP_COPY, v.VFIO_MIGRATION_P2P, v.VFIO_MIGRATION_PRE_COPY

#: name -> (migration, v2 flags, driver, vendor, device)
_BASE: dict[str, tuple[str, int, str, int, int]] = {
    "v1": ("v1", 0, "nvidia-vgpu-vfio", 0x10DE, 0x1EB8),
    "v2_stop_copy": ("v2", _SC, "hisi_acc_vfio_pci", 0x19E5, 0xA251),
    "v2_p2p": ("v2", _SC | _P2P, "pds_vfio_pci", 0x1DD8, 0x1003),
    "v2_precopy": ("v2", _SC | _PRE, "hisi_acc_vfio_pci", 0x19E5, 0xA255),
    "v2_precopy_p2p": ("v2", _SC | _P2P | _PRE, "mlx5_vfio_pci", 0x15B3, 0x101E),
}

#: The v1 register block's reserved bits are reported non-zero, so a client that does not
#: read-modify-write device_state fails loudly (docs/kernel-contract.md §5.2).
V1_RESERVED = 0x100


def capability_specs(**overrides: object) -> dict[str, DeviceSpec]:
    """All named specs; ``overrides`` (DeviceSpec fields, e.g. ``state_size=8192``) apply
    to every one of them. An unknown field raises TypeError naming it."""
    fields = {f.name for f in dataclasses.fields(DeviceSpec)}
    bad = sorted(set(overrides) - (fields - {"name"}))
    if bad:
        raise TypeError(f"capability_specs: cannot override {bad}")
    out: dict[str, DeviceSpec] = {}
    bus = 0x3B
    for base, (migration, flags, driver, vendor, device) in _BASE.items():
        for log in (False, True):
            name = f"{base}_log" if log else base
            extra: dict[str, object] = {"v1_reserved": V1_RESERVED} if migration == "v1" else {}
            spec = DeviceSpec(name=f"0000:{bus:02x}:00.{int(log)}", migration=migration,
                              mig_flags=flags, dma_logging=log, driver=driver,
                              vendor=vendor, device=device, extra=extra)
            out[name] = dataclasses.replace(spec, **overrides)  # type: ignore[arg-type]
        bus += 1
    out["not_migratable"] = dataclasses.replace(
        DeviceSpec(name=f"0000:{bus:02x}:00.0", migration="none", driver="vfio-pci",
                   vendor=0x8086, device=0x10ED), **overrides)  # type: ignore[arg-type]
    return out


#: Every capability set's name, in ``capability_specs`` order: what ``[[sim.device]]
#: capability`` of the daemon configuration accepts.
CAPABILITY_NAMES: tuple[str, ...] = tuple(capability_specs())
