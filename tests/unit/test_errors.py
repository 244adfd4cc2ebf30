"""``KernelError``: the errno stays, the layers rename it, the message reads the same way
whichever backend raised it (docs/architecture.md §2 "Errors")."""

from __future__ import annotations

import copy
import errno
import pickle

from vfiod.errors import KernelError


def test_message_names_the_operation_the_object_and_the_errno() -> None:
    e = KernelError(errno.EINVAL, "VFIO_IOMMU_MAP_DMA", "container /dev/vfio/vfio", "unaligned")
    assert str(e) == "VFIO_IOMMU_MAP_DMA on container /dev/vfio/vfio: EINVAL (unaligned)"
    assert isinstance(e, OSError) and e.errno == errno.EINVAL
    # 95 is ENOTSUP and EOPNOTSUPP on Linux; the VFIO documentation says EOPNOTSUPP
    assert KernelError(errno.EOPNOTSUPP, "op").errno_name == "EOPNOTSUPP"
    assert str(KernelError(errno.ENOENT, "open(/dev/vfio/7)")) == "open(/dev/vfio/7): ENOENT"


def test_with_context_renames_and_keeps_errno_and_detail() -> None:
    low = KernelError(errno.EBUSY, "ioctl(0x3b6e)", "", "in use")
    high = low.with_context(op="VFIO_GROUP_UNSET_CONTAINER", target="group 12")
    assert (high.errno, high.op, high.target, high.detail) == (
        errno.EBUSY, "VFIO_GROUP_UNSET_CONTAINER", "group 12", "in use")
    assert low.with_context(target="").target == ""          # an explicit empty target
    assert low.with_context().op == "ioctl(0x3b6e)"


def test_pickle_and_copy_keep_every_field() -> None:
    e = KernelError(errno.EIO, "pread(region 7 +0x0)", "0000:3b:00.1", "short read")
    for again in (pickle.loads(pickle.dumps(e)), copy.copy(e)):
        assert type(again) is KernelError
        assert (again.errno, again.op, again.target, again.detail) == (
            e.errno, e.op, e.target, e.detail)
        assert str(again) == str(e)
