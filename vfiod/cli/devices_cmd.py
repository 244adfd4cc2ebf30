"""``vfiod devices``: the VFIO devices on this host, whether vfiod can own them and whether
they can migrate (docs/architecture.md §1 steps 1 and 4; docs/kernel-contract.md §3.1 step 1, §4.1 step 1).

Sysfs discovery (``vfiod.vfio.discover``) says whether each device is "ours" (bound to
vfio-pci, a vfio-pci variant driver, or an mdev, in a viable IOMMU group) or "not ours"
with the reason. A device that is ours is then probed as ``vfiod ctl check DEVICE`` probes
it (its group opened briefly; a group a VMM holds is answered with EBUSY and left alone),
giving ``migratable`` and, when false, ``migratable_reason``. ``--sim`` lists a simulated
host instead (no VFIO needed); ``--sysfs-root``/``--dev-root`` point at another tree.
``--json`` prints a list of objects.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vfiod.cli.exits import Exit, report_error
from vfiod.errors import KernelError

if TYPE_CHECKING:
    from vfiod.kernel.ops import KernelOps
    from vfiod.vfio import DiscoveredDevice, HostPaths


DESCRIPTION = ("The VFIO devices on this host: whether vfiod can own each one (and why not), "
               "and whether it can migrate (and why not).")

EPILOG = """\
examples:
  vfiod devices                   this host's devices (a device that is ours is probed:
                                  its IOMMU group is opened briefly unless a VMM holds it)
  vfiod devices --sim --json      a simulated host, as JSON

exit status: see vfiod --help
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("devices", help="list VFIO devices, whether vfiod can own them "
                              "and whether they can migrate", description=DESCRIPTION,
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--sim", action="store_true", help="list a simulated host")
    p.add_argument("--sysfs-root", default="/sys")
    p.add_argument("--dev-root", default="/dev")
    p.set_defaults(handler=run)


def _row(kernel: KernelOps, paths: HostPaths, d: DiscoveredDevice) -> dict[str, Any]:
    from vfiod.daemon.check import device_migratability

    row = dataclasses.asdict(d)
    row["ours"] = d.vfio_capable
    for key in ("vendor", "device"):
        if row[key] is not None:
            row[key] = f"{row[key]:#06x}"
    return {**row, **device_migratability(kernel, paths, d.name, None)}


def list_devices(kernel: KernelOps, paths: HostPaths) -> list[dict[str, Any]]:
    # imported here: vfiod.vfio pulls in numpy, which `vfiod ctl` should not pay for
    from vfiod.vfio import discover

    return [_row(kernel, paths, d) for d in discover(kernel, paths)]


def _sim_rows() -> list[dict[str, Any]]:
    # imported here: the real-host path must not need the simulator
    from vfiod.kernel.sim import HostDevice, SimHost
    from vfiod.kernel.sim.migration import capability_specs
    from vfiod.vfio import HostPaths

    specs = capability_specs()
    vgpu = dataclasses.replace(specs["v1"], kind="mdev",
                               name="6c4e8e12-0b1a-4d1e-9d4f-2b7a3c5e0a11",
                               extra={**specs["v1"].extra, "parent": "nvidia0",
                                      "mdev_type": "nvidia-259"})
    groups: list[list[Any]] = [[s] for s in (vgpu, specs["v2_precopy_p2p_log"],
                                             specs["v2_stop_copy"], specs["not_migratable"])]
    groups.append([dataclasses.replace(specs["v2_p2p"], name="0000:5e:00.1"),
                   HostDevice("0000:5e:00.0", driver="mlx5_core")])
    groups.append([HostDevice("0000:00:1f.6", driver="e1000e")])
    with tempfile.TemporaryDirectory(prefix="vfiod-devices-") as tmp:
        host = SimHost.build(Path(tmp), groups)
        try:
            return list_devices(host.kernel, HostPaths(host.sysfs_root, host.dev_root))
        finally:
            host.close()


def _print(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no PCI or mdev devices found")
        return
    print(f"{'DEVICE':<38} {'KIND':<5} {'GROUP':>5} {'DRIVER':<20} {'VENDOR:DEVICE':<14} "
          "OURS MIGRATABLE WHY")
    for r in rows:
        ids = f"{r['vendor'] or '-'}:{r['device'] or '-'}".replace("0x", "")
        group = "-" if r["group"] is None else str(r["group"])
        why = r["reason"] if r["migratable"] or not r["ours"] else r["migratable_reason"]
        print(f"{r['name']:<38} {r['kind']:<5} {group:>5} {r['driver'] or '-':<20} "
              f"{ids:<14} {'yes' if r['ours'] else 'no':<4} "
              f"{'yes' if r['migratable'] else 'no':<10} {why}")


def run(args: argparse.Namespace) -> int:
    from vfiod.kernel.linux import LinuxKernel
    from vfiod.vfio import HostPaths

    try:
        rows = (_sim_rows() if args.sim else
                list_devices(LinuxKernel(), HostPaths(args.sysfs_root, args.dev_root)))
    except KernelError as e:
        return report_error("vfiod devices", Exit.FAILED, str(e), as_json=args.json)
    if args.json:
        print(json.dumps(rows))
    else:
        _print(rows)
    return 0
