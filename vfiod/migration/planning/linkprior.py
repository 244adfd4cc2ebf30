"""Bandwidth prior from the egress link to the destination (docs/architecture.md §4, §6).

Before the first 100 ms measurement window the predictor needs some bandwidth: this asks
the kernel which interface the route to the destination leaves by (``IPRoute().route('get',
dst=...)`` → ``RTA_OIF`` → ``IFLA_IFNAME``/``IFLA_MTU``) and what that link's speed is
(``pyroute2.ethtool.Ethtool().get_link_mode(ifname).speed``, Mb/s).

"Unknown" is a normal answer, not an error: loopback answers "not supported", virtio NICs
report no speed (``None``), some drivers report 0 or ``SPEED_UNKNOWN`` (-1, 0xFFFFFFFF);
there may be no route at all. Then ``LinkPrior.speed_bps`` is ``None`` and ``note`` says
why, so status can show that the predictor runs on a conservative default.

The netlink and ethtool objects are injected (``iproute``/``ethtool`` factories) so tests
can answer for them; the real ones are tested on loopback and on a veth pair in a private
network namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: ethtool's SPEED_UNKNOWN as the kernel reports it (-1 as u32) and as pyroute2 may pass it.
_UNKNOWN_SPEEDS = {0, -1, 0xFFFF, 0xFFFFFFFF}


@dataclass(frozen=True)
class LinkPrior:
    """What the egress link says about bandwidth (``speed_bps`` in bytes/s, or None)."""

    destination: str
    ifname: str | None
    speed_bps: float | None
    mtu: int | None
    note: str


def _default_iproute() -> Any:
    from pyroute2 import IPRoute
    return IPRoute()


def _default_ethtool() -> Any:
    from pyroute2.ethtool import Ethtool
    return Ethtool()


def link_prior(destination: str, *, iproute: Callable[[], Any] = _default_iproute,
               ethtool: Callable[[], Any] = _default_ethtool) -> LinkPrior:
    """Look up the egress interface to ``destination`` (an IP address) and its speed."""
    try:
        ipr = iproute()
    except Exception as e:  # noqa: BLE001 - no netlink (container, permissions): unknown
        return LinkPrior(destination, None, None, None, f"netlink unavailable: {e}")
    try:
        routes = ipr.route("get", dst=destination)
        oif = routes[0].get_attr("RTA_OIF") if routes else None
        if oif is None:
            return LinkPrior(destination, None, None, None,
                             f"no route to {destination} names an interface")
        links = ipr.get_links(oif)
        ifname = links[0].get_attr("IFLA_IFNAME") if links else None
        mtu = links[0].get_attr("IFLA_MTU") if links else None
    except Exception as e:  # noqa: BLE001 - pyroute2 raises NetlinkError(errno) and others
        return LinkPrior(destination, None, None, None,
                         f"route lookup for {destination} failed: {e}")
    finally:
        ipr.close()
    if not ifname:
        return LinkPrior(destination, None, None, mtu, f"interface {oif} has no name")
    return _with_speed(destination, ifname, mtu, ethtool)


def _with_speed(destination: str, ifname: str, mtu: int | None,
                ethtool: Callable[[], Any]) -> LinkPrior:
    try:
        eth = ethtool()
    except Exception as e:  # noqa: BLE001
        return LinkPrior(destination, ifname, None, mtu, f"{ifname}: ethtool unavailable: {e}")
    try:
        mode = eth.get_link_mode(ifname)
    except Exception as e:  # noqa: BLE001 - NotSupportedError on lo, EthtoolError elsewhere
        detail = str(e).strip() or type(e).__name__
        return LinkPrior(destination, ifname, None, mtu,
                         f"{ifname}: link speed not supported ({type(e).__name__}: {detail})")
    finally:
        eth.close()
    speed = getattr(mode, "speed", None)
    if not isinstance(speed, int) or speed in _UNKNOWN_SPEEDS or speed < 0:
        return LinkPrior(destination, ifname, None, mtu,
                         f"{ifname}: the driver reports no link speed ({speed!r})")
    return LinkPrior(destination, ifname, speed * 1e6 / 8, mtu, f"{ifname} {speed} Mb/s")
