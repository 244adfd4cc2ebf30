"""Error types shared by every layer (a leaf module: imports nothing from vfiod).

Callers branch on ``errno`` and on the exception type, never on message text.
Messages name the operation, the object and the errno, e.g.
``VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE PRE_COPY) on 0000:3b:00.1: EINVAL``.
"""

from __future__ import annotations

import errno as _errno
import os


class VfiodError(Exception):
    """Base class of every error vfiod raises on purpose."""


class KernelError(VfiodError, OSError):
    """A syscall (real or simulated) failed.

    ``op`` names the operation (``VFIO_IOMMU_MAP_DMA``, ``open(/dev/vfio/12)``),
    ``target`` the object it was issued on (a device name, a group, a path).
    It is also an ``OSError`` with the same ``errno`` so generic handlers work.
    """

    def __init__(self, err: int, op: str, target: str = "", detail: str = "") -> None:
        self.op = op
        self.target = target
        self.detail = detail
        OSError.__init__(self, err, os.strerror(err))
        self.errno: int = err

    @property
    def errno_name(self) -> str:
        # errno 95 is both ENOTSUP and EOPNOTSUPP on Linux; the VFIO docs say EOPNOTSUPP.
        if self.errno == _errno.EOPNOTSUPP:
            return "EOPNOTSUPP"
        return _errno.errorcode.get(int(self.errno), str(self.errno))

    def with_context(self, op: str | None = None, target: str | None = None) -> KernelError:
        """Return the same failure named by a higher layer (keeps the errno)."""
        return KernelError(int(self.errno), op or self.op, target if target is not None else self.target,
                           self.detail)

    def __str__(self) -> str:
        where = f" on {self.target}" if self.target else ""
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.op}{where}: {self.errno_name}{extra}"

    def __reduce__(self):  # keep pickling (multiprocessing) working
        return (KernelError, (self.errno, self.op, self.target, self.detail))


class ConfigError(VfiodError):
    """A configuration file or value is invalid; names the key and line."""


class ProtocolError(VfiodError):
    """A control message or migration stream is malformed; says where."""


class StreamError(ProtocolError):
    """A migration stream record is invalid (type, length, checksum, order)."""


class MigrationError(VfiodError):
    """A migration could not proceed; the source has been rolled back."""


class PreflightError(MigrationError):
    """Source and destination cannot migrate; lists every reason found."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = list(reasons)
        super().__init__("preflight refused: " + "; ".join(self.reasons))


class NotMigratable(VfiodError):
    """A device offers neither migration v2 nor v1; ``reason`` says why."""

    def __init__(self, device: str, reason: str) -> None:
        self.device = device
        self.reason = reason
        super().__init__(f"{device} is not migratable: {reason}")


class SimulatorViolation(VfiodError):
    """The simulated kernel saw a request that would hang or crash a real kernel.

    Example: MIG_DEVICE_STATE STOP_COPY -> PRE_COPY (soft lockup on kernels 6.2+).
    Never caught by vfiod: it must fail tests loudly.
    """
