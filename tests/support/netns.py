"""Two network namespaces joined by a veth pair, for the fault matrix's "link down" cases
(issue 10: tc netem is not available in this kernel's namespaces, so loss and delay belong
in ``fault_proxy``; a namespace gives a real link to take down).

    with veth_pair() as net:            # namespaces net.a and net.b, addresses net.addr_a/b
        FaultHost(..., netns=net.a)     # a daemon runs inside with ``in_netns(net.a, cmd)``
        net.set_link(up=False)          # the cable is pulled on a's side
        net.set_link(up=True)

Built with pyroute2 (namespaces, the veth pair, addresses, link state); processes enter a
namespace through ``ip netns exec`` (iproute2), which also gives them the namespace's
own /sys.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from pyroute2 import IPRoute, NetNS, netns

PREFIX = 24


@dataclass(frozen=True)
class NetPair:
    a: str                        # namespace names
    b: str
    addr_a: str
    addr_b: str
    if_a: str                     # the veth ends, one in each namespace
    if_b: str

    def set_link(self, *, up: bool) -> None:
        """Bring ``a``'s end of the veth pair down (nothing passes) or up again."""
        with NetNS(self.a) as ns:
            ns.link("set", index=ns.link_lookup(ifname=self.if_a)[0],
                    state="up" if up else "down")


def in_netns(name: str, cmd: list[str]) -> list[str]:
    """``cmd`` run inside namespace ``name``."""
    return ["ip", "netns", "exec", name, *cmd]


def _configure(name: str, ifname: str, address: str) -> None:
    with NetNS(name) as ns:
        lo = ns.link_lookup(ifname="lo")[0]
        ns.link("set", index=lo, state="up")
        idx = ns.link_lookup(ifname=ifname)[0]
        ns.addr("add", index=idx, address=address, prefixlen=PREFIX)
        ns.link("set", index=idx, state="up")


@contextmanager
def veth_pair(subnet: str = "10.231.0") -> Iterator[NetPair]:
    """Two fresh namespaces with ``subnet``.1 and ``subnet``.2 on a veth pair between them;
    both removed afterwards (the veth goes with them)."""
    tag = f"vf{os.getpid() % 100000}"
    pair = NetPair(f"{tag}a", f"{tag}b", f"{subnet}.1", f"{subnet}.2", f"{tag}va", f"{tag}vb")
    made: list[str] = []
    try:
        for name in (pair.a, pair.b):
            netns.create(name)
            made.append(name)
        with IPRoute() as ip:
            ip.link("add", ifname=pair.if_a, kind="veth", peer=pair.if_b)
            for ifname, name in ((pair.if_a, pair.a), (pair.if_b, pair.b)):
                ip.link("set", index=ip.link_lookup(ifname=ifname)[0], net_ns_fd=name)
        _configure(pair.a, pair.if_a, pair.addr_a)
        _configure(pair.b, pair.if_b, pair.addr_b)
        yield pair
    finally:
        for name in made:
            with suppress(OSError):
                netns.remove(name)
