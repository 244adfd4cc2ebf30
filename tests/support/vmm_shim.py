"""A small VMM for the kernel tier's hand-over test (docs/architecture.md §8.1): a process
that owns a guest the way QEMU does and hands it to vfiod with ``attach`` over the
control socket (SCM_RIGHTS), then keeps using its device.

    python -m tests.support.vmm_shim --socket CTRL --guest NAME --device UUID \
        --ram-size BYTES [--fill SEED]

It opens the device the legacy way through vfiod's own objects (container, group,
SET_CONTAINER, SET_IOMMU type1v2, device; a device a previous owner left stopped is
reset first: that is the VMM's business), creates its RAM as a memfd (filled with a
per-page pattern from SEED, or zero), maps it for DMA at iova 0, and prints one JSON line
with what the kernel says of its fds (the facts vfiod's checks rely on). Then it reads
one JSON command per line on stdin and answers one JSON line on stdout:

    {"op": "attach", "allow_reset": false}  hand RAM, container, group and device over
    {"op": "use"}                            read the device's PCI ids (config region)
                                             and its migration state through its own fd
    {"op": "ram"}                            sha256 of its RAM
    {"op": "quit"}                           close everything and exit

Every answer has ``ok``; a failure's answer has ``error``.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import mmap
import os
import sys
from typing import Any

from vfiod.api import ClientError, ControlClient
from vfiod.kernel.linux import LinuxKernel
from vfiod.migration.states import MigState
from vfiod.vfio import Container, Group, HostPaths, discover_device

CONFIG_REGION = 7          # VFIO_PCI_CONFIG_REGION_INDEX


def _facts(fd: int) -> dict[str, Any]:
    """fstat, the /proc link, fdinfo and /sys/dev/char of one fd, as the kernel says."""
    st = os.fstat(fd)
    out: dict[str, Any] = {"mode": oct(st.st_mode), "link": os.readlink(f"/proc/self/fd/{fd}")}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        out["fdinfo"] = f.read()
    if st.st_rdev:
        dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        out["rdev"] = dev
        out["sys"] = os.readlink(f"/sys/dev/char/{dev}")
    return out


class Shim:
    def __init__(self, args: argparse.Namespace) -> None:
        kernel, paths = LinuxKernel(), HostPaths()
        self.args = args
        found = discover_device(kernel, args.device, paths)
        if found.group is None:
            raise SystemExit(f"{args.device}: no IOMMU group: {found.reason}")
        self.container = Container.open(kernel, paths)
        self.group = Group.open(kernel, paths, found.group)
        self.group.set_container(self.container)
        self.container.set_iommu()
        self.device = self.group.get_device(args.device)
        if self.device.get_mig_state() != MigState.RUNNING:
            self.device.reset()
        self.ram_fd = os.memfd_create(f"vmm-shim-{args.guest}", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, args.ram_size)
        self.ram = mmap.mmap(self.ram_fd, args.ram_size)
        if args.fill:
            for page in range(0, args.ram_size, 4096):
                self.ram[page:page + 16] = (args.fill * 1_000_003 + page).to_bytes(16, "little")
        self._anchor = ctypes.c_char.from_buffer(self.ram)
        self.container.map_dma(0, ctypes.addressof(self._anchor), args.ram_size)

    def facts(self) -> dict[str, Any]:
        return {"container": _facts(self.container.fd), "group": _facts(self.group.fd),
                "device": _facts(self.device.fd), "group_number": self.group.number}

    def attach(self, allow_reset: bool) -> dict[str, Any]:
        req = {"guest": self.args.guest,
               "ram": [{"region": "ram", "gpa": 0, "size": self.args.ram_size, "offset": 0,
                        "fd": 0}],
               "vfio": [{"container": 1, "groups": [{"group": self.group.number, "fd": 2}],
                         "devices": [{"name": self.args.device, "fd": 3}]}],
               "allow_reset": allow_reset}
        with ControlClient(self.args.socket, timeout=120) as c:
            return c.call("attach", req, fds=[self.ram_fd, self.container.fd, self.group.fd,
                                               self.device.fd])

    def use(self) -> dict[str, Any]:
        ids = self.device.read_region(CONFIG_REGION, 0, 4)
        state = self.device.get_mig_state()
        return {"vendor": int.from_bytes(ids[:2], "little"),
                "device": int.from_bytes(ids[2:], "little"),
                "state": state.name if isinstance(state, MigState) else int(state)}

    def ram_digest(self) -> str:
        return hashlib.sha256(self.ram).hexdigest()

    def close(self) -> None:
        self.container.close()
        del self._anchor
        self.ram.close()
        os.close(self.ram_fd)


def _answer(out: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser(prog="vmm_shim")
    p.add_argument("--socket", required=True)
    p.add_argument("--guest", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--ram-size", type=int, required=True)
    p.add_argument("--fill", type=int, default=0)
    shim = Shim(p.parse_args())
    _answer({"ok": True, "facts": shim.facts()})
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                if cmd["op"] == "attach":
                    _answer({"ok": True, "result": shim.attach(bool(cmd.get("allow_reset")))})
                elif cmd["op"] == "use":
                    _answer({"ok": True, **shim.use()})
                elif cmd["op"] == "ram":
                    _answer({"ok": True, "sha256": shim.ram_digest()})
                elif cmd["op"] == "quit":
                    break
                else:
                    _answer({"ok": False, "error": f"unknown op {cmd['op']!r}"})
            except (ClientError, OSError) as e:
                _answer({"ok": False, "error": str(e)})
    finally:
        shim.close()
    _answer({"ok": True, "closed": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
