"""Ioctl request-number helpers for the VFIO and iommufd uAPI (docs/kernel-contract.md §0, §2).

Mirrors ``_IO()`` from ``<linux/ioctl.h>`` as used by ``<linux/vfio.h>`` and
``<linux/iommufd.h>``. Every VFIO and iommufd request is ``_IO(';', nr)``: no size and no
direction bits, so the request number is ``0x3b00 | nr`` on x86-64 and the argument
struct's size travels in its own ``argsz``/``size`` field instead.

The numbers are computed with ioctl-opt (the same macro arithmetic as the C headers), not
written out as literals, so a typo in ``nr`` cannot hide behind a hand-computed constant.
"""

from __future__ import annotations

import ioctl_opt
from ioctl_opt import IO

__all__ = [
    "IO", "VFIO_TYPE", "VFIO_BASE", "IOMMUFD_TYPE", "IOMMUFD_CMD_BASE",
    "vfio_io", "iommufd_io", "ioctl_nr", "ioctl_type", "is_plain_io",
]

#: ``VFIO_TYPE`` in <linux/vfio.h>: the ioctl "magic" character ';'.
VFIO_TYPE = ord(";")
#: ``VFIO_BASE``: the first VFIO ioctl nr (VFIO_GET_API_VERSION).
VFIO_BASE = 100
#: ``IOMMUFD_TYPE`` in <linux/iommufd.h>: the same ';' magic as VFIO.
IOMMUFD_TYPE = ord(";")
#: ``IOMMUFD_CMD_BASE``: first iommufd command nr (IOMMU_DESTROY).
IOMMUFD_CMD_BASE = 0x80


def vfio_io(offset: int) -> int:
    """``_IO(VFIO_TYPE, VFIO_BASE + offset)``."""
    return int(IO(VFIO_TYPE, VFIO_BASE + offset))


def iommufd_io(cmd: int) -> int:
    """``_IO(IOMMUFD_TYPE, cmd)`` for an ``IOMMUFD_CMD_*`` value."""
    return int(IO(IOMMUFD_TYPE, cmd))


def ioctl_nr(request: int) -> int:
    """The ``nr`` part of a request number (``_IOC_NR``)."""
    return int(ioctl_opt.IOC_NR(request))


def ioctl_type(request: int) -> int:
    """The type/magic part of a request number (``_IOC_TYPE``)."""
    return int(ioctl_opt.IOC_TYPE(request))


def is_plain_io(request: int) -> bool:
    """True for an ``_IO()`` request: no direction and no size bits (every VFIO/iommufd
    request is one; the simulator uses this to reject a mis-encoded request early)."""
    # ioctl_opt's own IOC_* names stay behind the module prefix: every upper-case int
    # in vfiod.abi is a kernel name that tests/abi checks against real headers.
    return bool(ioctl_opt.IOC_DIR(request) == ioctl_opt.IOC_NONE
                and ioctl_opt.IOC_SIZE(request) == 0)
