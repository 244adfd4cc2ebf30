"""What ``fstat(2)`` and ``/proc/self/fd`` say about a simulated VFIO file, as the real
kernel answers for its files (docs/architecture.md §8.1: checking VFIO fds a VMM hands
over; the real answers, seen on 6.12, are listed there):

* the container ``/dev/vfio/vfio``: the misc character device 10:196;
* a group ``/dev/vfio/N``: a character device of the dynamic ``vfio`` major, whose
  ``/sys/dev/char/MAJ:MIN`` link ends in ``virtual/vfio/N``;
* a device fd from ``VFIO_GROUP_GET_DEVICE_FD``: an anonymous inode without a file type,
  linked as ``anon_inode:[vfio-device]``;
* a device cdev ``/dev/vfio/devices/vfioN``: a character device of the ``vfio-dev``
  major, whose ``/sys/dev/char`` link ends in ``<device>/vfio-dev/vfioN``;
* ``/dev/iommu``: a misc character device.

``SimHost`` writes the matching ``/sys/dev/char`` links into its tree.
"""

from __future__ import annotations

from vfiod.kernel.ops import FdFacts
from vfiod.kernel.sim.base import SimFile
from vfiod.kernel.sim.cdev import CdevFile
from vfiod.kernel.sim.group import GroupFile

#: (major, minor) of the simulated character devices
CONTAINER_RDEV = (10, 196)          # VFIO_MINOR of the misc major
IOMMUFD_RDEV = (10, 122)            # a dynamic misc minor in the real kernel
GROUP_MAJOR = 242                   # the dynamic "vfio" major
CDEV_MAJOR = 511                    # the dynamic "vfio-dev" major


def sim_fd_facts(file: SimFile, fd: int) -> FdFacts:
    """The facts of simulated ``file`` open as ``fd`` (st_dev/st_ino: the file object,
    so two fds of one open file compare equal, as dups do)."""
    rdev: tuple[int, int] | None = None
    link = f"anon_inode:[{file.kind}]"
    kind = "unknown"
    if file.kind == "container":
        rdev, link = CONTAINER_RDEV, "/dev/vfio/vfio"
    elif file.kind == "iommufd":
        rdev, link = IOMMUFD_RDEV, "/dev/iommu"
    elif isinstance(file, GroupFile):
        number = file.group.number
        rdev, link = (GROUP_MAJOR, number), f"/dev/vfio/{number}"
    elif isinstance(file, CdevFile) and file.node.cdev_name is not None:
        rdev = (CDEV_MAJOR, int(file.node.cdev_name.removeprefix("vfio")))
        link = f"/dev/vfio/devices/{file.node.cdev_name}"
    elif file.kind == "device":
        link = "anon_inode:[vfio-device]"
    if rdev is not None:
        kind = "char"
    return FdFacts(False, kind, 0, 0, id(file), True, rdev, link)
