"""``vfiod ctl check DEVICE|GUEST``: can it migrate, and if not, why (docs/architecture.md §1 step 4
probes, step 5 preflight facts; docs/kernel-contract.md §5.1 v1 discovery, §6.2 v2 flags, §3.9 and §7
dirty tracking).

The answer separates *blockers* (the migration will be refused) from *notes* (it will run,
but an operator should know: no dirty tracking means pre-copy cannot converge, an opted-out
device's pages all move in stop-and-copy, little memlock headroom to receive a guest, a
device without an ``id``, which pairs with a destination device only by its name).

For a guest it also gives the outlook (vfiod.migration.planning.outlook): the predicted
downtime floor and a verdict, "converges", "converges only with a forced switchover" or
"will not converge", with every reason (RAM pre-copy can never clean because of an
opt-out or a container without dirty tracking, device state too large for the limit at the
bandwidth, a measured dirty rate at or above it). The bandwidth is the configured cap, else
what this guest's last outgoing migration measured, else the 1 Gb/s default; the limit and
the give-up action are the daemon's migration defaults. A guest that will not converge is
not reported migratable. It also says who may migrate the guest: plain TCP is not
authenticated; under TLS, the allow-list that applies, or any peer the CA certified
(``peer_auth.py``).

A device of a guest is described from what the daemon probed when it opened the guest. A
device no guest owns is probed on the spot (``probe_unowned_device``: the same steps and
the same description as a guest's devices, vfiod.migration.guest.migratability). If
another process holds the group (a VMM), that is the answer (EBUSY).
"""

from __future__ import annotations

import errno
import threading
from typing import Any

from vfiod.daemon.config import MigrationConfig
from vfiod.daemon.lifecycle import RUNS_HERE, LifecycleState
from vfiod.daemon.peer_auth import allowed_peers, link_notes
from vfiod.daemon.registry import DeviceEntry, GuestEntry
from vfiod.dirty.providers.base import ProviderName
from vfiod.dirty.providers.select import is_mdev
from vfiod.errors import KernelError, NotMigratable, VfiodError
from vfiod.kernel.ops import KernelOps
from vfiod.migration.guest import Guest
from vfiod.migration.guest.migratability import probe_unowned_device
from vfiod.migration.planning.hostfacts import HostFacts
from vfiod.migration.planning.outlook import WILL_NOT, DeviceOutlook, Outlook, outlook
from vfiod.migration.planning.predictor import DEFAULT_BANDWIDTH_BPS
from vfiod.migration.planning.preflight import ENCRYPTION_NAMES
from vfiod.vfio import HostPaths
from vfiod.vfio.discovery import DiscoveredDevice, discover_device


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def device_notes(d: DeviceEntry) -> list[str]:
    notes = []
    if d.tracker == ProviderName.NONE:
        notes.append(f"{d.name}: its container has no dirty-page tracking: every mapped page "
                     "counts dirty at every sync, so pre-copy cannot converge and the downtime "
                     "includes all of the container's mapped RAM")
    if not d.pre_copy_dirty_page_tracking:
        notes.append(f"{d.name}: pre-copy dirty page tracking is off (opt-out): its "
                     "container is not queried until stop-and-copy, which moves the pages "
                     "it wrote; until then the part a sample shows written counts dirty")
    return notes


def _tracked(d: DeviceEntry, entry: GuestEntry) -> bool:
    """Does ``d``'s container report only written pages? (dirty/providers/select.py: a type1
    container with an IOMMU-backed device reports every mapped page dirty)."""
    if d.tracker in (None, ProviderName.NONE):
        return False
    if d.tracker != ProviderName.TYPE1:
        return True
    return all(is_mdev(o.name) for o in entry.devices.values() if o.container == d.container)


def _state_bytes(guest: Guest | None, busy: bool) -> dict[str, int | None]:
    """Each device's stop-copy size as its driver estimates it now (v2 MIG_DATA_SIZE);
    not asked while a migration drives the devices."""
    out: dict[str, int | None] = {}
    for gd in guest.devices if guest is not None and not busy else ():
        try:
            p = gd.driver.save_live_pending()
        except (VfiodError, OSError):
            continue
        out[gd.name] = p.stopcopy_bytes if p.exact or p.stopcopy_bytes else None
    return out


def guest_outlook(entry: GuestEntry, defaults: MigrationConfig,
                  guest: Guest | None) -> Outlook:
    gc = entry.config
    last = entry.migration if entry.migration and entry.migration.role == "source" else None
    if defaults.bandwidth_limit:
        bw, src = float(defaults.bandwidth_limit), "the configured bandwidth_limit"
    elif last is not None and last.progress.bandwidth_bps:
        bw, src = last.progress.bandwidth_bps, f"measured by migration {last.id}"
    else:
        bw, src = DEFAULT_BANDWIDTH_BPS, "the 1 Gb/s default: link speed unknown"
    sizes = _state_bytes(guest, entry.migration is not None and entry.migration.active)
    devices = [DeviceOutlook(d.name, d.container, sum(r.size for r in gc.regions_of(d.container)),
                             _tracked(d, entry), not d.pre_copy_dirty_page_tracking,
                             sizes.get(d.name))
               for d in entry.devices.values()]
    return outlook(gc.ram_bytes, devices, bandwidth_bps=bw, bandwidth_source=src,
                   limit_s=defaults.downtime_limit_ms / 1000, on_give_up=defaults.on_timeout,
                   dirty_rate_bps=last.progress.dirty_rate_bps if last else None)


def check_guest(entry: GuestEntry, host: HostFacts, *,
                defaults: MigrationConfig | None = None,
                guest: Guest | None = None) -> dict[str, Any]:
    """``defaults``: the daemon's migration defaults (limit, bandwidth cap, give-up);
    ``guest``: the open guest, whose drivers say how large their device state is."""
    gc = entry.config
    blockers: list[str] = []
    notes: list[str] = []
    if entry.state is LifecycleState.FAILED:
        blockers.append(f"guest {gc.name} could not be opened: {entry.error}")
    elif entry.state not in RUNS_HERE:
        blockers.append(f"guest {gc.name} does not run here (it is {entry.state})")
    if gc.memory_encryption != "none":
        name = ENCRYPTION_NAMES.get(gc.memory_encryption, gc.memory_encryption)
        blockers.append(f"guest {gc.name} uses {name} memory encryption: its RAM is "
                        "ciphertext to the host, so it cannot be migrated by copying pages")
    ids = {d.name: d.id for d in gc.devices}
    notes += [f"{d.name}: no id is configured: a destination pairs this device only with a "
              "device of the same name, and PCI addresses differ between hosts; give it the "
              "same id in both hosts' configurations (a mismatch is a preflight refusal)"
              for d in gc.devices if d.id == d.name]
    for d in entry.devices.values():
        if not d.migratable and entry.state is not LifecycleState.FAILED:
            blockers.append(f"{d.name}: not migratable: {d.reason or 'not opened'}")
        elif not d.migratable and d.reason:
            blockers.append(f"{d.name}: {d.reason}")
        notes += device_notes(d)
    if entry.migration is not None and entry.migration.active:
        notes.append(f"a migration is running now ({entry.migration.role}, to/from "
                     f"{entry.migration.peer})")
    room = host.memlock.headroom()
    if room is not None and room < gc.ram_bytes:
        notes.append(f"as a destination this host could pin {_gib(room)} more but the guest "
                     f"needs {_gib(gc.ram_bytes)}: set LimitMEMLOCK=infinity in the unit "
                     "or grant CAP_IPC_LOCK")
    defaults = defaults or MigrationConfig()
    notes += link_notes(gc, defaults)
    view = guest_outlook(entry, defaults, guest)
    return {"target": gc.name, "kind": "guest",
            "migratable": not blockers and view.verdict != WILL_NOT,
            "blockers": blockers, "notes": notes, "outlook": view.to_json(),
            "link": {"tls": defaults.tls is not None,
                     "allow_peers": list(allowed_peers(gc, defaults)[0])},
            "devices": [{"id": ids.get(d.name, d.name), **_device_json(d)}
                        for d in entry.devices.values()],
            "host": host_json(host, gc.ram_bytes)}


def check_owned_device(d: DeviceEntry, entry: GuestEntry) -> dict[str, Any]:
    blockers = [] if d.migratable else [d.reason or f"guest {entry.name} is not open "
                                        f"({entry.error or entry.state})"]
    return {"target": d.name, "kind": "device", "guest": entry.name,
            "migratable": not blockers, "blockers": blockers, "notes": device_notes(d),
            **_device_json(d)}


def _device_json(d: DeviceEntry) -> dict[str, Any]:
    return {"name": d.name, "protocol": d.protocol, "capabilities": d.capabilities,
            "state": d.state_label, "tracker": d.tracker, "dma_logging": d.dma_logging,
            "pre_copy_dirty_page_tracking": d.pre_copy_dirty_page_tracking,
            "migratable": d.migratable, "reason": d.reason}


def host_json(host: HostFacts, need: int | None = None) -> dict[str, Any]:
    m = host.memlock
    return {"hostname": host.hostname, "cpu_abi_level": host.cpu.abi_level.label,
            "page_size": host.page_size, "memlock_headroom_bytes": m.headroom(),
            "cap_ipc_lock": m.cap_ipc_lock, "sev": host.sev.host_offers_sev}


#: A probe opens the device's group, which the kernel lets one open hold: two requests
#: probing at once (``ctl devices`` beside ``ctl check DEVICE``) take turns here, or the
#: second would report the daemon's own probe as another process holding the group.
_PROBING = threading.Lock()


def probe_unowned(kernel: KernelOps, paths: HostPaths, name: str) -> dict[str, Any]:
    """Probe a device no guest owns (``KernelError(ENODEV)`` if sysfs has no such device)."""
    found = discover_device(kernel, name, paths)
    out: dict[str, Any] = {"target": name, "kind": "device", "guest": None,
                           **_discovered_json(found)}
    if not found.vfio_capable or found.group is None:
        return {**out, "migratable": False, "blockers": [found.reason], "notes": []}
    try:
        with _PROBING:
            m = probe_unowned_device(kernel, paths, found.name, found.group)
    except NotMigratable as e:
        return {**out, "migratable": False, "blockers": [e.reason], "notes": []}
    except KernelError as e:
        why = str(e)
        if e.errno == errno.EBUSY:
            why = (f"IOMMU group {found.group} is open in another process (a VMM owns the "
                   f"device); vfiod cannot probe it: {e}")
        return {**out, "migratable": False, "blockers": [why], "notes": []}
    notes = []
    if m.tracker == ProviderName.NONE:
        notes.append(f"{name}: no dirty-page tracking available: pre-copy cannot converge")
    return {**out, "protocol": m.protocol, "capabilities": list(m.capabilities),
            "dma_logging": m.dma_logging, "tracker": m.tracker, "migratable": True,
            "blockers": [], "notes": notes}


def device_migratability(kernel: KernelOps, paths: HostPaths, name: str,
                         owned: DeviceEntry | None) -> dict[str, Any]:
    """``migratable`` and, when false, ``migratable_reason`` for one row of ``vfiod devices``
    and ``vfiod ctl devices``: what ``check`` says of the device (its first blocker)."""
    if owned is not None:
        ok, why = owned.migratable, owned.reason or "not opened"
    else:
        try:
            r = probe_unowned(kernel, paths, name)
        except KernelError as e:
            r = {"migratable": False, "blockers": [f"cannot probe it: {e}"]}
        ok, why = r["migratable"], "; ".join(r["blockers"])
    return {"migratable": ok, "migratable_reason": None if ok else why}


def _discovered_json(found: DiscoveredDevice) -> dict[str, Any]:
    return {"device_kind": found.kind, "group": found.group, "driver": found.driver,
            "vfio_capable": found.vfio_capable, "reason": found.reason}
