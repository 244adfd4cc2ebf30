"""A guest's ``[[guest.device]]`` and ``[[guest.container]]`` tables, validated for
``config.py`` (docs/architecture.md §6; ``from = "vmm"``: §8.1).

    [[guest.device]]
    name = "0000:3b:00.1"                # this host's PCI address (or mdev UUID)
    id = "nic0"                          # the same on both hosts: migrations pair by it
    container = "default"                # devices of one container share its IOMMU space
    pre_copy_dirty_page_tracking = true  # false = QEMU's x-pre-copy-dirty-page-tracking=off
    from = "vmm"                         # optional: the VMM hands its VFIO fds over
    [[guest.container]]                  # optional: a container mapping only some regions
    name = "default"
    map = ["ram0"]
"""

from __future__ import annotations

from dataclasses import dataclass

from vfiod.daemon.config_ram import RamConfig
from vfiod.daemon.config_toml import DEVICE_NAME, NAME, Table


@dataclass(frozen=True)
class DeviceConfig:
    name: str
    container: str = "default"
    pre_copy_dirty_page_tracking: bool = True
    #: the host-independent id migrations pair devices by; "" = the name (no ``id`` key)
    id: str = ""
    #: its VFIO fds come from the VMM with ``attach`` (docs/architecture.md §8.1)
    from_vmm: bool = False

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", self.name)


@dataclass(frozen=True)
class ContainerConfig:
    name: str
    map: tuple[str, ...]           # RAM regions mapped for DMA in this container


def parse_devices(t: Table, name: str, ram: tuple[RamConfig, ...]) -> list[DeviceConfig]:
    """Guest ``name``'s devices; the first error names the key."""
    devices: list[DeviceConfig] = []
    for d in t.tables("device"):
        dev_name = str(d.string("name", required=True, pattern=DEVICE_NAME,
                                hint="a PCI address (0000:3b:00.1) or an mdev UUID"))
        dev = DeviceConfig(
            dev_name, str(d.string("container", "default", pattern=NAME)),
            d.boolean("pre_copy_dirty_page_tracking", True),
            str(d.string("id", dev_name, pattern=NAME,
                         hint="letters, digits and '_.+-', at most 64, the same on both "
                              "hosts")),
            d.string("from", pattern="vmm", hint='"vmm": the VMM hands its fds over') == "vmm")
        if dev.from_vmm and not all(r.from_vmm for r in ram):
            raise d.error("from", f"a device from the VMM needs guest {name}'s RAM from the "
                          'VMM too (every [[guest.ram]] from = "vmm"): the VMM\'s container '
                          "maps the VMM's RAM")
        mixed = next((o for o in devices if o.container == dev.container
                      and o.from_vmm != dev.from_vmm), None)
        if mixed is not None:
            raise d.error("from", f"container {dev.container!r} of guest {name} holds "
                          f"{mixed.name} {'from' if mixed.from_vmm else 'not from'} the VMM: "
                          "a container's devices are all from the VMM (it hands the whole "
                          "container over) or none")
        # (a device listed twice is refused by name in _cross_checks)
        twin = next((o for o in devices if o.id == dev.id and o.name != dev.name), None)
        if twin is not None:
            raise d.error("id" if d.has("id") else "name",
                          f"device id {dev.id!r} of {dev.name} is already the id of "
                          f"{twin.name} in guest {name} (a device without id has its name "
                          "as id): ids must be unique within a guest")
        devices.append(dev)
        d.finish()
    return devices


def parse_containers(t: Table, name: str, ram: tuple[RamConfig, ...],
                     devices: list[DeviceConfig]) -> list[ContainerConfig]:
    """Guest ``name``'s containers that map only some RAM regions."""
    containers = []
    for c in t.tables("container"):
        cname = str(c.string("name", required=True, pattern=NAME))
        regions = c.raw("map")
        if (not isinstance(regions, list) or not regions
                or not all(isinstance(x, str) for x in regions)):
            raise c.error("map", "must be a non-empty array of RAM region names")
        unknown = sorted(set(regions) - {r.name for r in ram})
        if unknown:
            raise c.error("map", f"no RAM region(s) {unknown}; guest {name} has "
                          f"{[r.name for r in ram]}")
        if cname not in {d.container for d in devices}:
            raise c.error("name", f"no [[guest.device]] of guest {name} is in container "
                          f"{cname!r}")
        c.finish()
        containers.append(ContainerConfig(cname, tuple(regions)))
    return containers
