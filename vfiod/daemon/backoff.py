"""The accept loops' backoff (README "Limits"): when ``accept`` fails because the process
is out of file descriptors (EMFILE), the system is (ENFILE) or the kernel is out of memory,
retrying at once would spin a core while nothing can change; the loop pauses instead,
doubling from ``ACCEPT_BACKOFF_S[0]`` up to ``ACCEPT_BACKOFF_S[1]`` and starting over after
an accept succeeds. Used by the control socket and the migration port.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

log = logging.getLogger("vfiod.daemon")

#: The first pause after EMFILE and kin, and the cap as it doubles (seconds).
ACCEPT_BACKOFF_S = (0.01, 1.0)
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class AcceptBackoff:
    """``pause(seconds)`` waits (returning early when the server closes)."""

    def __init__(self, what: str, pause: Callable[[float], object]) -> None:
        self.what = what
        self.pause = pause
        self._delay = 0.0

    def failed(self, err: int | None) -> bool:
        """After a failed accept: pause if it ran out of resources (True), else False."""
        if err not in OUT_OF_RESOURCES:
            return False
        first, cap = ACCEPT_BACKOFF_S
        self._delay = min(cap, self._delay * 2 if self._delay else first)
        log.warning("%s: accept: %s; pausing %.2f s", self.what,
                    errno.errorcode.get(err or 0, str(err)), self._delay)
        self.pause(self._delay)
        return True

    def succeeded(self) -> None:
        self._delay = 0.0
