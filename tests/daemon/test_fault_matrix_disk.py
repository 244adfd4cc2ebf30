"""The fault matrix, disk part (issue 10 item 6): a full disk under the journal, on the
source or the destination, before a migration or in the middle of it (filled as the
destination's ACK header arrives: after the source's first records, before its commit),
and a full disk under the file transport (a snapshot written with ``FileSink``; the
daemon has no snapshot operation, so this one runs at the library level). A journal that
cannot record a step must stop the step: the guest still runs on exactly one host with
its RAM as of the pause (docs/architecture.md §1 steps 5-8, §5 file target)."""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemons import wait_until
from tests.support.fault_link import FaultPlan, Point
from tests.support.fault_matrix import (
    MATRIX_MIGRATION,
    POINT_S,
    RATE_BPS,
    case_log,
    journals,
    judge,
)
from tests.support.fault_proxy import FaultProxy
from tests.support.fault_rig import (
    FaultHost,
    FaultPair,
    RigGuest,
    fill_disk,
    mount_tmpfs,
    pattern,
    unmount,
)
from tests.support.fault_table import record
from vfiod.api.client import ClientError
from vfiod.errors import KernelError, ProtocolError
from vfiod.kernel.linux import LinuxKernel
from vfiod.migration.stream import GuestRam, StreamHeader, StreamReader, StreamWriter
from vfiod.migration.transport import FileSink, FileSource
from vfiod.vfio import RamRegion

CASES = [("src", "before"), ("dst", "before"), ("src", "setup"), ("dst", "setup")]
TABLE = "journal on a full disk"
STATE_TMPFS = 512 * 1024


def _guest(host: str, when: str) -> str:
    return f"journal-full-{host}.{when}"


@pytest.fixture(scope="module")
def pair() -> Iterator[FaultPair]:
    guests = [RigGuest(_guest(h, w), i, state_size=1 << 20) for i, (h, w) in enumerate(CASES)]
    p = FaultPair(guests, migration=MATRIX_MIGRATION, state_tmpfs=STATE_TMPFS)
    try:
        p.start()
        yield p
    finally:
        p.close()


def use_up_the_journals_last_page(host: FaultHost) -> None:
    """A full tmpfs still takes appends into the journal file's last, partly used page:
    restart the daemon (each start records its guests' steps) until one of its records
    no longer fits, so that the migration meets a journal that cannot write."""
    for _ in range(8):
        if NOT_JOURNALED in host.log():
            return
        host.restart()
    raise AssertionError(f"{host.name}: the journal never filled:\n{host.log()[-3000:]}")


#: what the daemon logs for a transition its journal could not hold (lifecycle.py)
NOT_JOURNALED = "not journaled"


def _ended(h: FaultHost, guest: str) -> bool:
    m = h.migration(guest)
    return m is not None and m["result"] is not None


@pytest.mark.parametrize("which, when", CASES, ids=[_guest(h, w) for h, w in CASES])
def test_journal_disk_full(pair: FaultPair, which: str, when: str) -> None:
    guest = _guest(which, when)
    full = pair.src if which == "src" else pair.dst
    state = full.root / "state"
    fillers: list[Path] = []
    if when == "before":
        fillers.append(fill_disk(state))
        use_up_the_journals_last_page(full)
        plan = FaultPlan(None)
    else:
        plan = FaultPlan(None, Point.SETUP, on_fire=lambda: fillers.append(fill_disk(state)))
    proxy = FaultProxy(pair.dst_address, plan, rate_bps=RATE_BPS)
    mid: str | None = None
    try:
        try:
            mid = pair.src.migrate(guest, proxy.address)
        except ClientError as e:             # refused at once: it could not journal it
            assert pair.src.guest_state(guest) == "running", e
            assert "was not migrated" in str(e) and "No space left" in str(e), e
        if mid is not None:
            wait_until(lambda: _ended(pair.src, guest)
                       or pair.src.guest_state(guest) == "outcome-unknown",
                       POINT_S, f"{guest}'s migration to end")
        # the journal that had room when the migration began names it
        journaled = [] if mid is None else [       # refused at once: nothing to name
            h for h in journals(pair, proxy) if not (h is full and when == "before")]
        verdict = judge(pair, guest, mid, journaled)
    finally:
        proxy.close()
        for f in fillers:
            f.unlink()
    record(TABLE, f"full on {which}", "before the migration" if when == "before"
           else "from the setup on", verdict.cell)
    verdict.check(lambda: case_log(pair, guest, mid or guest))
    assert pair.src.alive() and pair.dst.alive(), "a full disk must not stop the daemon"


def test_file_transport_disk_full(tmp_path: Path) -> None:
    """A snapshot to a full disk fails with ENOSPC naming the file; the guest's memory is
    only read; the partial snapshot is refused on restore, never loaded as a whole one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount_tmpfs(disk, 256 * 1024)
    try:
        ops = LinuxKernel()
        size = 1 << 20
        ram = bytearray(pattern("snapshot", size))
        region = RamRegion("ram", 0, size)
        header = StreamHeader("src-host", "snap-1", "snapshot", 4096, (region,), ())
        path = str(disk / "snap.vfiod")
        with FileSink(ops, path) as sink:
            w = StreamWriter(sink, header, GuestRam(4096, (region,), [ram]))
            w.start()
            with pytest.raises(KernelError) as exc:
                w.send_ram([(0, size // 4096)], quiescent=True)
        assert exc.value.errno == errno.ENOSPC and path in str(exc.value), str(exc.value)
        assert hashlib.sha256(ram).digest() == hashlib.sha256(pattern("snapshot", size)).digest()
        with FileSource(ops, path) as source, pytest.raises(ProtocolError):
            r = StreamReader(source)
            r.read_header()
            r.attach_ram(GuestRam(4096, (region,), [bytearray(size)], writable=True))
            for _ in r.events():
                pass
        record("other faults", "snapshot to a full disk (FileSink)", "outcome",
               "write refused naming the file (ENOSPC); guest RAM untouched; partial "
               "snapshot refused on restore")
    finally:
        unmount(disk)
