"""A stopped tracker gives its buffers back (vfiod/dirty/tracker.py ``stop``; docs/benchmarks.md
§2, "RSS per guest"): the scratch bitmap always, the guest's bitmap when nothing
is left dirty in it (a finished migration took its last pass). Nothing is lost: bits
still dirty at the stop stay, and tracking started again sees every write.

The memory itself is checked in a fresh interpreter with glibc's thresholds pinned as the
daemon pins them (``vfiod.daemon.main.MALLOC_THRESHOLD``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemons import child_env
from tests.support.dirty_rig import GUEST_PAGE, Rig, dev
from vfiod.dirty.global_bitmap import GlobalBitmap
from vfiod.dirty.ranges import PageRange
from vfiod.dirty.tracker import DirtyTracker
from vfiod.vfio import RamRegion

MDEV = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
G = GUEST_PAGE


@pytest.fixture
def rig(tmp_path: Path):  # noqa: ANN201
    r = Rig(tmp_path, [[dev(MDEV, kind="mdev")]])
    r.type1("c0", [10])
    r.map("c0", 0x100000, 0, 256 * G)
    yield r
    r.close()


def _tracker(rig: Rig) -> DirtyTracker:
    return DirtyTracker([RamRegion("ram", 0, 256 * G)], [rig.containers["c0"].tracked()])


def test_stop_gives_the_scratch_back_and_a_restart_sees_every_write(rig: Rig) -> None:
    tr = _tracker(rig)
    tr.start(initial_all_dirty=True)
    assert tr.scratch_bytes == 32           # 256 pages: 4 words
    assert len(rig.sent(tr.take_dirty_runs(1 << 20))) == 256
    tr.stop()
    assert tr.scratch_bytes == 0
    assert tr.status().dirty_pages == 0
    tr.start(initial_all_dirty=False)
    try:
        assert tr.scratch_bytes == 32
        rig.write(MDEV, "c0", 0x100000 + 70 * G, 3 * G)
        assert rig.written == {70, 71, 72}
        tr.sync()
        assert rig.sent(tr.take_dirty_runs(1 << 20)) == {70, 71, 72}
    finally:
        tr.stop()


def test_pages_still_dirty_at_the_stop_are_kept(rig: Rig) -> None:
    tr = _tracker(rig)
    tr.start(initial_all_dirty=False)
    rig.write(MDEV, "c0", 0x100000 + 5 * G, G)
    tr.sync()
    tr.stop()                               # a cancelled pass: page 5 was never sent
    assert tr.status().dirty_pages == 1
    assert rig.sent(tr.take_dirty_runs(1 << 20)) == {5}


def test_release_if_clear_keeps_dirty_words() -> None:
    b = GlobalBitmap(1000)
    b.mark_all(PageRange(10, 3))
    assert b.release_if_clear() is False
    assert b.count() == 3 and int(b.words[0]) == 0b111 << 10
    b.clear()
    assert b.release_if_clear() is True
    assert b.count() == 0 and not b.words.any() and b.words.size == 16
    b.mark_all(PageRange(999, 1))           # the new words work as the old ones did
    assert b.count() == 1


#: In a fresh interpreter: a 1 TiB guest's bitmap (32 MiB) all dirty, its pass taken; then
#: print the anonymous RSS released_if_clear gave back, in MiB.
_GIVEN_BACK = """
import json
from vfiod.daemon.main import MALLOC_THRESHOLD
from vfiod.kernel.linux import pin_malloc_thresholds
from vfiod.dirty.global_bitmap import GlobalBitmap
def anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:")) / 1024
assert pin_malloc_thresholds(MALLOC_THRESHOLD)
b = GlobalBitmap(1 << 28)
b.mark_all()
runs = b.take_runs(1 << 20)
del runs
before = anon()
released = b.release_if_clear()
print(json.dumps({"released": released, "given_back_mib": before - anon()}))
"""


def test_a_clear_bitmap_gives_its_memory_back() -> None:
    out = subprocess.run([sys.executable, "-c", _GIVEN_BACK], env=child_env(),
                         capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["released"] is True
    assert got["given_back_mib"] > 30, got   # the 32 MiB of words, less noise
