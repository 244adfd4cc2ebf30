"""A guest's ``[guest.qemu]`` table: the QEMU that runs its vCPUs and migrates its RAM
beside vfiod (docs/architecture.md §8.3), validated for ``config.py``.

    [guest.qemu]
    qmp = "/run/vm1.vfiod.qmp"       # vfiod's own -qmp socket (QEMU serves one client per
                                     # socket); also the guest's run-state backend
    incoming = "tcp:0.0.0.0:4444"    # where this host's QEMU listens when it is the
                                     # destination (its -incoming); 0.0.0.0 or [::]: the
                                     # source connects to the host it migrates to
    timeout_s = 60                   # longest wait for QEMU: its switchover point, its
                                     # incoming migration, a cancel

With this table a migration of the guest is coordinated with QEMU's own (``vfiod ctl
migrate`` starts both), and ``runstate`` defaults to ``qmp:`` the same socket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vfiod.daemon.config_toml import Table

#: ``tcp:HOST:PORT`` with HOST a name, an IPv4 address or a bracketed IPv6 address
INCOMING_PATTERN = r"tcp:(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}"
#: hosts that mean "every address of this host": the source substitutes the peer's
ANY_HOST = ("0.0.0.0", "[::]", "::")


@dataclass(frozen=True)
class QemuConfig:
    qmp: str
    incoming: str | None = None
    timeout_s: float = 60.0


def parse_qemu(t: Table) -> QemuConfig | None:
    """The guest's ``[guest.qemu]``, or None without one; errors name the key."""
    if not t.has("qemu"):
        return None
    q = t.table("qemu")
    qmp = str(q.string("qmp", required=True, pattern=r"/.+",
                       hint="the absolute path of vfiod's own -qmp unix socket"))
    incoming = q.string("incoming", pattern=INCOMING_PATTERN,
                        hint='"tcp:HOST:PORT", the address in this QEMU\'s -incoming')
    if incoming is not None and not 0 < int(incoming.rsplit(":", 1)[1]) < 65536:
        raise q.error("incoming", f"{incoming!r}: the port must be 1-65535")
    timeout = float(q.number("timeout_s", 60.0, low=0.1, high=3600) or 60.0)
    q.finish()
    return QemuConfig(qmp, incoming, timeout)


def incoming_uri(incoming: str, peer_host: str) -> str:
    """QEMU's ``migrate`` URI for a destination listening at ``incoming``: an any-address
    host is replaced by ``peer_host`` (the host vfiod migrates to)."""
    m = re.fullmatch(INCOMING_PATTERN, incoming)
    if m is None:
        raise ValueError(f"the destination's QEMU address {incoming!r} is not tcp:HOST:PORT")
    host = m.group(1)
    if host in ANY_HOST:
        host = f"[{peer_host}]" if ":" in peer_host else peer_host
    return f"tcp:{host}:{incoming.rsplit(':', 1)[1]}"
