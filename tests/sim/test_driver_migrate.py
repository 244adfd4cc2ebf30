"""Save on host A → load on host B for every capability set, through the drivers' hooks
(docs/architecture.md §1.5; docs/kernel-contract.md §5.5–§5.6, §6.7–§6.10, §9.1 fd behaviour)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.support.driver_rig import CAPS, Side, collect, load, migrate, pair, save, spec_for
from vfiod.errors import KernelError, MigrationError, ProtocolError
from vfiod.kernel.sim.base import SimFile
from vfiod.migration.device.errors import DeviceMismatch, ForbiddenTransition, HookOrderError
from vfiod.migration.device.protocol import HookPhase
from vfiod.migration.device.record import decode_record
from vfiod.migration.device.v2 import V2Driver
from vfiod.migration.states import MigState

# What the kernel is asked, in order, by a source and a destination (docs/kernel-contract.md §5.4,
# §6.6 paths). v2: the arcs the kernel walks; v1: the device_state values written.
SOURCE_PATH = {
    "v1": ["v1:SAVING|RUNNING", "v1:SAVING", "v1:STOP"],
    "v2_stop_copy": ["RUNNING->STOP", "STOP->STOP_COPY", "STOP_COPY->STOP"],
    "v2_p2p": ["RUNNING->RUNNING_P2P", "RUNNING_P2P->STOP", "STOP->STOP_COPY",
               "STOP_COPY->STOP"],
    "v2_precopy": ["RUNNING->PRE_COPY", "PRE_COPY->STOP_COPY", "STOP_COPY->STOP"],
    "v2_precopy_p2p": ["RUNNING->PRE_COPY", "PRE_COPY->PRE_COPY_P2P",
                       "PRE_COPY_P2P->STOP_COPY", "STOP_COPY->STOP"],
}
_DST_PLAIN = ["RUNNING->STOP", "STOP->RESUMING", "RESUMING->STOP", "STOP->RUNNING"]
_DST_P2P = ["RUNNING->RUNNING_P2P", "RUNNING_P2P->STOP", "STOP->RESUMING", "RESUMING->STOP",
            "STOP->RUNNING_P2P", "RUNNING_P2P->RUNNING"]
DEST_PATH = {
    "v1": ["v1:RESUMING", "v1:RUNNING"],
    "v2_stop_copy": _DST_PLAIN, "v2_p2p": _DST_P2P, "v2_precopy": _DST_PLAIN,
    "v2_precopy_p2p": _DST_P2P,
}


def _arcs(side: Side) -> list[str]:
    return [t.removeprefix("transition:") for t in side.transitions()]


@pytest.fixture
def sides(request: pytest.FixtureRequest, tmp_path: Path):
    made: list[Side] = []

    def make(cap: str, **kw: object) -> tuple[Side, Side]:
        s, d = pair(tmp_path, cap, **kw)
        made.extend((s, d))
        return s, d
    yield make
    for side in made:
        side.close()


@pytest.mark.parametrize("cap", CAPS + ["v2_precopy_p2p_log", "v1_log"])
def test_save_on_a_load_on_b_models_equal(sides, cap: str) -> None:
    src, dst = sides(cap)
    assert src.model != dst.model                    # different seeds: a real transfer
    s, d = migrate(src, dst)
    assert dst.model == src.model
    assert dst.model.digest() == src.model.digest()
    assert s.state() is MigState.STOP and src.kernel_state() is MigState.STOP
    assert d.state() is MigState.RUNNING and dst.kernel_state() is MigState.RUNNING
    assert src.data_fds() == [] and dst.data_fds() == []
    assert s.phase is HookPhase.IDLE and d.phase is HookPhase.IDLE
    assert src.resets() == 0 and dst.resets() == 0


@pytest.mark.parametrize("cap", CAPS)
def test_kernel_sees_the_documented_sequence(sides, cap: str) -> None:
    src, dst = sides(cap)
    migrate(src, dst)
    assert _arcs(src) == SOURCE_PATH[cap]
    assert _arcs(dst) == DEST_PATH[cap]


@pytest.mark.parametrize("cap", CAPS)
def test_hook_sequence(sides, cap: str) -> None:
    src, dst = sides(cap)
    s, d = src.driver(), dst.driver()
    hooks: list[str] = []
    record, chunks = save(src, s, hooks=hooks)
    load(d, record, chunks, hooks=hooks)
    s.cleanup()
    d.cleanup()
    assert hooks[1:3] == ["save_live_pending", "save_live_iterate"]
    squeezed = [h for i, h in enumerate(hooks) if i == 0 or hooks[i - 1] != h]
    body = [h for h in squeezed if h not in ("save_live_pending", "save_live_iterate")]
    expect = ["save_setup", "save_state"] + (["quiesce_p2p"] if s.has_p2p else []) + [
        "save_live_complete_precopy", "check_state", "load_setup", "load_state",
        "load_complete", "resume"]
    assert body == expect


@pytest.mark.parametrize("cap", CAPS)
def test_hooks_out_of_order_are_refused(sides, cap: str) -> None:
    src, dst = sides(cap)
    s, d = src.driver(), dst.driver()
    with pytest.raises(HookOrderError, match="save_live_iterate on .*phase IDLE"):
        s.save_live_iterate(lambda c: None, 4096)
    with pytest.raises(HookOrderError):
        s.save_live_complete_precopy(lambda c: None)
    with pytest.raises(HookOrderError, match="load_state"):
        d.load_state(b"x")
    with pytest.raises(HookOrderError, match="resume"):
        d.resume()
    d.load_setup()
    with pytest.raises(HookOrderError, match="save_setup .*phase LOADING"):
        d.save_setup()
    with pytest.raises(HookOrderError, match="resume .*phase LOADING"):
        d.resume()
    d.rollback()
    # nothing reached the kernel from the refused calls: the device is as it was
    assert src.transitions() == [] and src.kernel_state() is MigState.RUNNING
    assert dst.kernel_state() is MigState.RUNNING


@pytest.mark.parametrize("cap", ["v1", "v2_stop_copy", "v2_precopy"])
def test_quiesce_p2p_without_p2p_is_refused(sides, cap: str) -> None:
    src, _ = sides(cap)
    s = src.driver()
    assert not s.has_p2p
    s.save_setup()
    with pytest.raises(MigrationError, match="P2P"):
        s.quiesce_p2p()
    s.rollback()


@pytest.mark.parametrize("empty", ["enomsg", "zero"])
def test_precopy_zero_or_enomsg_is_not_the_end(sides, empty: str) -> None:
    src, dst = sides("v2_precopy", extra={"precopy_empty": empty})
    s = src.driver()
    chunks: list[bytes] = []
    s.save_setup()
    while s.save_live_iterate(collect(chunks), 1 << 20):
        pass
    assert s.save_live_pending().precopy_bytes == 0
    assert s.save_live_iterate(collect(chunks), 1 << 20) == 0     # nothing now ...
    src.model.tick(5)                                              # ... the device runs on
    assert s.save_live_pending().precopy_bytes > 0
    assert s.save_live_iterate(collect(chunks), 1 << 20) > 0       # ... and there is more
    s.save_live_complete_precopy(collect(chunks))
    d = dst.driver()
    load(d, s.save_state(), chunks)
    assert dst.model == src.model
    s.cleanup()
    d.cleanup()


def test_iterate_respects_max_bytes(sides) -> None:
    src, _ = sides("v2_precopy")
    s = src.driver()
    s.save_setup()
    got: list[bytes] = []
    n = s.save_live_iterate(collect(got), 1000)
    assert n == 1000 == sum(map(len, got))
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        s.save_live_iterate(collect(got), 0)
    s.rollback()


@pytest.mark.parametrize("cap", CAPS)
def test_pending(sides, cap: str) -> None:
    src, _ = sides(cap)
    s = src.driver()
    s.save_setup()
    p = s.save_live_pending()
    if cap == "v1":
        assert not p.exact and p.precopy_bytes == p.stopcopy_bytes > 0
    else:
        assert p.exact
        assert p.stopcopy_bytes == src.device.mig_data_size()
        assert (p.precopy_bytes > 0) == s.has_precopy
    s.rollback()


def test_stopcopy_size_unknown_without_mig_data_size(sides, monkeypatch) -> None:
    src, _ = sides("v2_stop_copy")
    s = src.driver()

    def enotty() -> int:
        raise KernelError(errno.ENOTTY, "VFIO_DEVICE_FEATURE(GET MIG_DATA_SIZE)", src.name)
    monkeypatch.setattr(src.device, "mig_data_size", enotty)
    p = s.save_live_pending()
    assert not p.exact and p.stopcopy_bytes == 100 << 30


def test_precopy_fd_is_kept_through_p2p_and_stop_copy(sides) -> None:
    src, dst = sides("v2_precopy_p2p")
    s = src.driver()
    assert isinstance(s, V2Driver)
    chunks: list[bytes] = []
    s.save_setup()
    fd = s.data_fd
    assert fd >= 0 and src.data_fds() == [fd]
    s.save_live_iterate(collect(chunks), 4096)
    s.quiesce_p2p()
    assert s.data_fd == fd and s.state() is MigState.PRE_COPY_P2P
    s.save_live_complete_precopy(collect(chunks))
    assert s.data_fd == fd and src.data_fds() == [fd]        # STOP_COPY returned -1
    s.cleanup()
    assert s.data_fd == -1 and src.data_fds() == []
    s.cleanup()                                              # idempotent
    d = dst.driver()
    load(d, s.save_state(), chunks)
    assert dst.model == src.model
    d.cleanup()


def test_a_new_fd_replaces_and_closes_the_old(sides, monkeypatch) -> None:
    src, _ = sides("v2_precopy")
    s = src.driver()
    assert isinstance(s, V2Driver)
    s.save_setup()
    old = s.data_fd
    real = src.device.set_mig_state

    def new_fd(state: int) -> int:
        real(state)
        return src.host.kernel.install(SimFile("replacement"))   # a driver handing a new fd
    monkeypatch.setattr(src.device, "set_mig_state", new_fd)
    s.set_state(MigState.STOP_COPY, MigState.RUNNING)
    assert s.data_fd != old and s.data_fd in src.host.kernel.open_files()
    assert old not in src.host.kernel.open_files()
    monkeypatch.setattr(src.device, "set_mig_state", real)
    s.rollback()
    assert src.host.kernel.open_files().get(s.data_fd) is None


def test_stop_copy_to_precopy_is_refused_before_the_kernel(sides) -> None:
    src, _ = sides("v2_precopy_p2p")
    s = src.driver()
    assert isinstance(s, V2Driver)
    s.save_setup()
    s.save_live_complete_precopy(lambda c: None)
    before = src.transitions()
    for target in (MigState.PRE_COPY, MigState.PRE_COPY_P2P):
        with pytest.raises(ForbiddenTransition, match="STOP_COPY -> PRE_COPY"):
            s.set_state(target, MigState.RUNNING)
    assert src.transitions() == before and src.kernel_state() is MigState.STOP_COPY
    assert s.rollback() is MigState.RUNNING


def test_v1_data_goes_through_the_sparse_mmap(sides, monkeypatch) -> None:
    src, dst = sides("v1")
    maps: list[tuple[int, int, int]] = []
    for side in (src, dst):
        real = side.device.mmap_region

        def spy(index: int, offset: int, length: int, *a: object, _real=real) -> object:
            maps.append((index, offset, length))
            return _real(index, offset, length, *a)
        monkeypatch.setattr(side.device, "mmap_region", spy)
    migrate(src, dst)
    assert dst.model == src.model
    region = src.device.find_region(3, 1)
    assert region is not None and region.sparse
    area = region.sparse[0]
    assert maps == [(region.index, *area), (region.index, *area)]   # one map per side


def test_v1_reads_through_pread_when_mmap_is_unavailable(sides, monkeypatch) -> None:
    src, dst = sides("v1")

    def no_mmap(*a: object, **k: object) -> object:
        raise ValueError("no mmap here")
    monkeypatch.setattr(src.device, "mmap_region", no_mmap)
    monkeypatch.setattr(dst.device, "mmap_region", no_mmap)
    migrate(src, dst)
    assert dst.model == src.model


def test_v1_chunks_larger_than_the_destination_window_are_split(tmp_path: Path) -> None:
    spec = spec_for("v1", extra={"v1_window": 16 * 1024, "v1_reserved": 0x100})
    src = Side.build(tmp_path / "A", spec)
    import dataclasses
    dst = Side.build(tmp_path / "B", dataclasses.replace(
        spec, seed=5, extra={"v1_window": 4096, "v1_reserved": 0x100}))
    try:
        s, d = src.driver(), dst.driver()
        record, chunks = save(src, s)
        assert max(map(len, chunks)) > 4096
        load(d, record, chunks)
        assert dst.model == src.model
        s.cleanup()
        d.cleanup()
    finally:
        src.close()
        dst.close()


def test_identity_record_and_mismatch(tmp_path: Path) -> None:
    a = Side.build(tmp_path / "A", spec_for("v2_precopy_p2p"))
    b = Side.build(tmp_path / "B", spec_for("v2_p2p"))
    c = Side.build(tmp_path / "C", spec_for("v1"))
    try:
        da, db, dc = a.driver(), b.driver(), c.driver()
        rec = decode_record(da.save_state())
        assert rec["name"] == a.name and rec["protocol"] == "v2" and rec["flags"] == 7
        da.check_state(da.save_state())
        with pytest.raises(DeviceMismatch, match=r"flags: source .* has 0x7, destination "
                                                 r".* has 0x3"):
            db.check_state(da.save_state())
        with pytest.raises(DeviceMismatch) as ei:
            dc.check_state(da.save_state())
        assert any(r.startswith("protocol: source") for r in ei.value.reasons)
        for bad, why in ((b"\xff", "not a vfiod device record"), (b"[]", "missing"),
                         (b'{"vfiod_device_record":1,"name":"x","protocol":"v2"}', "flags"),
                         (b"{" + b" " * 5000 + b"}", "more than")):
            with pytest.raises(ProtocolError, match=why):
                db.check_state(bad)
    finally:
        for s in (a, b, c):
            s.close()


@pytest.mark.parametrize("cap", ["v1", "v2_precopy"])
def test_the_same_driver_migrates_twice(sides, cap: str) -> None:
    src, dst = sides(cap)
    s = src.driver()
    s.save_setup()
    s.save_live_iterate(lambda c: None, 4096)
    s.rollback()                                   # cancelled once ...
    src.model.tick(2)
    d = dst.driver()
    record, chunks = save(src, s)                  # ... then migrated for real
    load(d, record, chunks)
    assert dst.model == src.model


@pytest.mark.parametrize("cap", [c for c in CAPS if c != "v1"])
def test_small_reads_carry_the_whole_stream(sides, cap: str) -> None:
    src, dst = sides(cap)
    s = V2Driver(src.device, src.device.mig_flags() or 0, chunk_size=1000)
    d = V2Driver(dst.device, dst.device.mig_flags() or 0, chunk_size=1000)
    record, chunks = save(src, s, max_bytes=3000)
    assert max(map(len, chunks)) <= 1000 and sum(map(len, chunks)) > 12 * 1024
    load(d, record, chunks)
    assert dst.model == src.model
    s.cleanup()
    d.cleanup()
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        V2Driver(src.device, 1, chunk_size=0)
