"""The control socket's file (docs/architecture.md §6): bound mode 0660 and owned by the
control group, a stale file left by a crashed daemon replaced, and one that another
running daemon listens on, or that is not a socket, left alone with a clear error.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

from vfiod.errors import VfiodError

log = logging.getLogger("vfiod.control")


def listen_control_socket(path: str, group: str, allowed_gid: int | None,
                          backlog: int) -> socket.socket:
    """A listening Unix stream socket at ``path``; VfiodError naming what failed."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o660)
        if allowed_gid is not None:
            try:
                os.chown(path, -1, allowed_gid)
            except OSError as e:           # not root and not in the group: root-only then
                log.warning("cannot give %s to group %s: %s", path, group, e.strerror)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise VfiodError(f"control socket {path}: {errno.errorcode.get(e.errno or 0, e)}"
                         f" ({e.strerror})") from None
    return sock


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise VfiodError(f"control socket {path} exists and is not a socket; "
                         "refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)                    # nobody listens: left over from a crash
        return
    finally:
        probe.close()
    raise VfiodError(f"control socket {path} is in use: another vfiod is running")
