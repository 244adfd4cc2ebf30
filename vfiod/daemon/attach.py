"""Checking what a VMM hands over with ``attach`` before any of it is used
(docs/architecture.md §8.1).

``check_hand_over`` compares the request with the guest's configuration (every
``from = "vmm"`` region handed over once, at its configured address and size, at a
page-aligned offset) and every fd with the kernel's facts about it (``KernelOps.
describe_fd``: a regular file, the memfd, hugetlbfs or shared file QEMU's
``memory-backend-*,share=on`` uses; open read-write; large enough for the region at its
offset). Two regions on the same bytes of one file, an fd sent but used by no region,
and an fd whose bytes another open guest's RAM already maps are refused too. Every refusal is an ``ApiError`` naming the fd (its index in the order
sent) and the region; nothing is opened or mapped before all checks passed. The VFIO
fds that may come with the RAM are checked by ``attach_vfio.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vfiod.api.ops import AttachArgs, RamHandOver
from vfiod.api.schema import ApiError, ApiErrorCode
from vfiod.daemon.config import GuestConfig
from vfiod.daemon.guest_plan import RamInUse
from vfiod.errors import KernelError
from vfiod.kernel.ops import FdFacts, KernelOps

#: Builds the refusal for one message (it names the guest and says nothing was attached).
Refuse = Callable[[str], ApiError]


def check_hand_over(kernel: KernelOps, gc: GuestConfig, args: AttachArgs,
                    in_use: Sequence[RamInUse] = ()) -> dict[str, tuple[int, int]]:
    """Region name -> (fd, offset) for ``GuestManager.attach``; ``ApiError`` naming the
    first thing that is wrong. ``in_use``: the RAM other guests map (none may be handed
    over again)."""
    refuse = refusal(gc)
    wanted = {r.name: r for r in gc.vmm_ram}
    if not wanted:
        raise refuse("its configuration takes no RAM from the VMM (no [[guest.ram]] with "
                     'from = "vmm")')
    given = {h.region: h for h in args.ram}
    unknown = sorted(set(given) - set(wanted))
    if unknown:
        raise refuse(f"region(s) {unknown} are not from = \"vmm\" regions of the guest "
                     f"(those are {sorted(wanted)})")
    missing = sorted(set(wanted) - set(given))
    if missing:
        raise refuse(f"region(s) {missing} were not handed over")
    for h in args.ram:
        r = wanted[h.region]
        if (h.gpa, h.size) != (r.gpa, r.size):
            raise refuse(f"region {h.region} is configured at gpa {r.gpa:#x} size "
                         f"{r.size:#x}, handed over at gpa {h.gpa:#x} size {h.size:#x}")
        if h.offset % gc.page_size:
            raise refuse(f"region {h.region}: offset {h.offset:#x} is not a multiple of "
                         f"the page size {gc.page_size:#x}")
        if h.fd >= len(args.fds):
            raise refuse(f"region {h.region} names fd index {h.fd}, but "
                         f"{len(args.fds)} fd(s) came with the request")
    vfio_fds = {i for c in args.vfio for i in c.fd_indexes()}
    unused = sorted(set(range(len(args.fds))) - {h.fd for h in args.ram} - vfio_fds)
    if unused:
        raise refuse(f"fd index(es) {unused} came with the request but no region or VFIO "
                     "object uses them")
    facts = {i: _facts(kernel, args.fds[i], i, refuse)
             for i in sorted({h.fd for h in args.ram})}
    for h in args.ram:
        _check_fd(facts[h.fd], h, refuse)
    _check_distinct(args.ram, facts, refuse)
    for h in args.ram:
        f = facts[h.fd]
        for u in in_use:
            if ((f.device, f.inode) == (u.device, u.inode) and h.offset < u.offset + u.size
                    and u.offset < h.offset + h.size):
                raise refuse(f"fd index {h.fd} (region {h.region}) is RAM guest {u.guest} "
                             f"already uses (its region {u.region}): a foreign fd")
    return {h.region: (args.fds[h.fd], h.offset) for h in args.ram}


def refusal(gc: GuestConfig) -> Refuse:
    """The refusal builder of ``attach`` for guest ``gc``."""
    def refuse(message: str) -> ApiError:
        return ApiError(ApiErrorCode.FAILED,
                        f"attach {gc.name}: {message}; nothing was attached")
    return refuse


def _facts(kernel: KernelOps, fd: int, index: int, refuse: Refuse) -> FdFacts:
    try:
        return kernel.describe_fd(fd)
    except KernelError as e:
        raise refuse(f"fd index {index} cannot be examined: {e}") from None


def _check_fd(f: FdFacts, h: RamHandOver, refuse: Refuse) -> None:
    name = f"fd index {h.fd} (region {h.region})"
    if not f.regular:
        raise refuse(f"{name} is a {f.kind}, not a memory file (a memfd, a hugetlbfs "
                     "file or a shared file)")
    if not f.writable:
        raise refuse(f"{name} is not open read-write: vfiod maps guest RAM shared and "
                     "writable")
    if f.size < h.offset + h.size:
        raise refuse(f"{name} is {f.size} bytes; the region needs {h.size} bytes at offset "
                     f"{h.offset:#x}")


def _check_distinct(ram: tuple[RamHandOver, ...], facts: dict[int, FdFacts],
                    refuse: Refuse) -> None:
    for i, a in enumerate(ram):
        fa = facts[a.fd]
        for b in ram[:i]:
            fb = facts[b.fd]
            same_file = (fa.device, fa.inode) == (fb.device, fb.inode)
            if same_file and a.offset < b.offset + b.size and b.offset < a.offset + a.size:
                raise refuse(f"regions {b.region} (fd index {b.fd}) and {a.region} (fd index "
                             f"{a.fd}) are the same bytes of one file: a duplicated fd")
