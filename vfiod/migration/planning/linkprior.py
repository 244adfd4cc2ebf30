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

The daemon never calls ``link_prior`` itself: importing pyroute2 loads it and ``asyncio``
(about 210 modules, 10.6 MiB) for two queries per migration. A short-lived child process
runs it (``linkprior_probe.py``, started by ``daemon/link_prior_lookup.py``) and answers with
``prior_to_json``; ``prior_from_json`` reads that answer back, and a ``LinkPriorSource``
may be such a lookup, answering "unknown" until the child's answer has arrived.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
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


#: A prior, or a function answering the latest one (a lookup still running answers with an
#: "unknown" prior whose note says so), or none.
LinkPriorSource = LinkPrior | Callable[[], LinkPrior] | None

_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "destination": (str,), "ifname": (str, type(None)), "speed_bps": (int, float, type(None)),
    "mtu": (int, type(None)), "note": (str,)}


def prior_to_json(prior: LinkPrior) -> str:
    """One line of JSON, the lookup child's answer (``prior_from_json`` reads it)."""
    return json.dumps(asdict(prior))


def prior_from_json(text: str) -> LinkPrior:
    """``prior_to_json``'s line back; ``ValueError`` naming what is wrong with anything else."""
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(raw, dict) or set(raw) != set(_FIELD_TYPES):
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"not a LinkPrior: expected the fields {sorted(_FIELD_TYPES)}, "
                         f"got {got}")
    for name, types in _FIELD_TYPES.items():
        if isinstance(raw[name], bool) or not isinstance(raw[name], types):
            raise ValueError(f"not a LinkPrior: {name} is {raw[name]!r}")
    speed = raw["speed_bps"]
    if speed is not None and not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"not a LinkPrior: speed_bps is {speed!r}, not a positive rate")
    return LinkPrior(raw["destination"], raw["ifname"],
                     None if speed is None else float(speed), raw["mtu"], raw["note"])


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
