"""Who may use the control socket (docs/architecture.md §6): the peer's credentials as
the kernel recorded them at connect() (``SO_PEERCRED``), and the check that root and
members of the control group pass, primary or supplementary (from /proc/PID/status).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    """The connecting process's credentials as the kernel recorded them at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def proc_groups(cred: PeerCred, proc_root: str = "/proc") -> frozenset[int]:
    """The peer's supplementary groups from /proc/PID/status (empty if unreadable: the
    process may have exited, and then it is refused unless root or the primary group)."""
    try:
        with open(os.path.join(proc_root, str(cred.pid), "status"), encoding="ascii",
                  errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
    except OSError:
        pass
    return frozenset()


def check_peer(cred: PeerCred, allowed_gid: int | None, group_name: str,
               groups: Callable[[PeerCred], frozenset[int]] = proc_groups) -> str | None:
    """None if ``cred`` may use the socket, else the refusal message."""
    if cred.uid == 0:
        return None
    if allowed_gid is not None and (cred.gid == allowed_gid or allowed_gid in groups(cred)):
        return None
    why = (f"group {group_name!r} (gid {allowed_gid})" if allowed_gid is not None else
           f"group {group_name!r}, which does not exist on this host")
    return (f"uid {cred.uid} (pid {cred.pid}) is neither root nor a member of {why}: "
            "ask an administrator to add you to that group")
