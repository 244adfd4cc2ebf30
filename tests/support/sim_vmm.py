"""A "VMM" on the simulated kernel for the VFIO hand-over tests (docs/architecture.md §8.1).

The simulated kernel lives inside the daemon's process, so its VFIO fds cannot travel over
a real socket: the daemon runs in-process (a ``Daemon`` on the sim backend, started off the
main thread), and the VMM opens its container, groups and devices through the daemon's own
``SimKernel``, maps its RAM (a memfd) for DMA, and hands everything over by calling the
control dispatcher as the control server would: with fresh copies of its fds (what
SCM_RIGHTS gives the receiver), closed again once the request was answered. RAM hand-over
over the real socket is tested in tests/daemon/test_attach.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vfiod.api.client import ControlClient
from vfiod.api.ops import AttachArgs, parse_args
from vfiod.daemon.main import Daemon, RunOptions, read_config
from vfiod.errors import KernelError
from vfiod.migration.guest import RamBlock
from vfiod.vfio import Container, Device, Group, RamRegion
from vfiod.vfio.discovery import discover_device


@contextmanager
def sim_daemon_in_process(tmp: Path, config: str, *, shut_down: bool = True
                          ) -> Iterator[Daemon]:
    """A started sim ``Daemon`` with its own journal and control socket under ``tmp``
    (unless ``config`` names its ``[paths]``); ``shut_down``: stop it at the end (a test
    of the stop itself stops it)."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "vfiod.toml"
    if "[paths]" not in config:     # its own journal, not this host's /var/lib/vfiod
        config += f'\n[paths]\nstate = "{tmp / "state"}"\n'
    path.write_text(config)
    opts = RunOptions(backend="sim", config=str(path), control_socket=str(tmp / "c.sock"),
                      metrics_listen="", sim_root=str(tmp / "host"))
    daemon = Daemon(opts, read_config(opts))
    failed: list[BaseException] = []

    def start() -> None:
        try:
            daemon.start()
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            failed.append(e)
    t = threading.Thread(target=start)     # off the main thread: no signal handlers
    t.start()
    t.join(120)
    if failed:
        raise failed[0]
    try:
        yield daemon
    finally:
        if shut_down:
            daemon.shutdown()


def call(daemon: Daemon, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    with ControlClient(daemon.info.control_socket) as c:
        return c.call(op, args or {})


class SimVmm:
    """Guest RAM of ``size`` bytes at gpa 0 in a memfd, and ``devices`` opened the
    legacy way (one container, their groups) in ``daemon``'s simulated kernel, the RAM
    mapped for DMA at iova == gpa."""

    def __init__(self, daemon: Daemon, devices: list[str], size: int, label: str) -> None:
        self.kernel, paths = daemon.kernel, daemon.paths
        self.ram = RamBlock.open(self.kernel, RamRegion("ram", 0, size), label=label)
        self.container = Container.open(self.kernel, paths)
        self.groups: dict[int, Group] = {}
        self.devices: dict[str, Device] = {}
        for name in devices:
            number = discover_device(self.kernel, name, paths).group
            assert number is not None
            if number not in self.groups:
                self.groups[number] = Group.open(self.kernel, paths, number)
                self.groups[number].set_container(self.container)
        self.container.set_iommu()
        self.container.map_dma(0, self.ram.addr, size)
        for name in devices:
            number = discover_device(self.kernel, name, paths).group
            assert number is not None
            self.devices[name] = self.groups[number].get_device(name)

    def fds(self) -> list[int]:
        """RAM, container, groups, devices: the order ``request`` indexes them in."""
        return [self.ram.fd, self.container.fd, *(g.fd for g in self.groups.values()),
                *(d.fd for d in self.devices.values())]

    def request(self, guest: str, **extra: Any) -> dict[str, Any]:
        """The attach arguments for these fds, in the order of ``fds()``."""
        n_groups = len(self.groups)
        return {"guest": guest,
                "ram": [{"region": "ram", "gpa": 0, "size": self.ram.size, "offset": 0,
                         "fd": 0}],
                "vfio": [{"container": 1,
                          "groups": [{"group": g, "fd": 2 + i}
                                     for i, g in enumerate(self.groups)],
                          "devices": [{"name": n, "fd": 2 + n_groups + i}
                                      for i, n in enumerate(self.devices)]}],
                **extra}

    def close(self) -> None:
        self.container.close()
        self.ram.close()


@contextmanager
def vmms_closed(*vmms: SimVmm) -> Iterator[None]:
    """Close ``vmms`` after the block. A VMM's close fails (EBUSY) while a daemon still
    holds copies of its fds, as it may when the block failed half-way; that close error
    would then replace the block's failure in the report (the kernel error is raised
    ``from None``), so after a failure the VMMs are closed as far as they can be and the
    block's own error is what the test reports."""
    try:
        yield
    except BaseException:
        for vmm in vmms:
            try:
                vmm.close()
            except KernelError:
                pass                 # the block's failure is the one to report
        raise
    for vmm in vmms:
        vmm.close()


def hand_over(daemon: Daemon, raw: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """``attach`` as the control server runs it: the daemon gets its own copies of
    ``fds`` (as SCM_RIGHTS gives them), closed once the request was answered; an
    ``ApiError`` comes back raised."""
    kernel = daemon.kernel
    copies = []
    for fd in fds:
        try:
            copies.append(kernel.dup(fd))
        except OSError:
            copies.append(fd)         # a closed fd: the test wants the daemon to see it
    args = parse_args("attach", raw)
    assert isinstance(args, AttachArgs)
    args = AttachArgs(args.guest, args.ram, tuple(copies), args.vfio, args.allow_reset)
    assert daemon.control is not None
    try:
        return daemon.control.dispatch("attach", args)
    finally:
        for fd, orig in zip(copies, fds, strict=True):
            if fd != orig:
                kernel.close(fd)
