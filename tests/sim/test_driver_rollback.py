"""Rollback from every phase leaves a source RUNNING (no reset needed without a fault) and
a destination reset to RUNNING; no path ever asks for STOP_COPY → PRE_COPY(_P2P)
(docs/architecture.md §1.6; docs/kernel-contract.md §5.4, §6.6 and pitfall §11.1)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.driver_rig import CAPS, PathRecorder, Side, collect, pair, record_paths, save
from vfiod.migration.device.protocol import HookPhase, MigrationDriver
from vfiod.migration.states import MigState


def _setup(s: MigrationDriver, src: Side) -> None:
    s.save_setup()


def _iterated(s: MigrationDriver, src: Side) -> None:
    s.save_setup()
    src.model.tick(3)
    s.save_live_iterate(lambda c: None, 6000)


def _quiesced(s: MigrationDriver, src: Side) -> None:
    _iterated(s, src)
    if s.has_p2p:
        s.quiesce_p2p()


def _completed(s: MigrationDriver, src: Side) -> None:
    _quiesced(s, src)
    s.save_live_complete_precopy(lambda c: None)


def _cleaned(s: MigrationDriver, src: Side) -> None:
    _completed(s, src)
    s.cleanup()


SOURCE_PHASES: dict[str, Callable[[MigrationDriver, Side], None]] = {
    "setup": _setup, "iterated": _iterated, "quiesced": _quiesced,
    "completed": _completed, "cleaned_up": _cleaned,
}


def expected_state(s: MigrationDriver, phase: str) -> MigState:
    """Where the device must be after ``phase`` (docs/kernel-contract.md §5.4, §6.10 flows)."""
    live = MigState.PRE_COPY if s.has_precopy else MigState.RUNNING
    if phase in ("setup", "iterated"):
        return live
    if phase == "quiesced":
        if not s.has_p2p:
            return live
        return MigState.PRE_COPY_P2P if s.has_precopy else MigState.RUNNING_P2P
    if phase == "completed" and s.protocol == "v2":
        return MigState.STOP_COPY
    return MigState.STOP


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch):
    rec = record_paths(monkeypatch)
    yield rec
    assert rec.forbidden() == [], "a STOP_COPY -> PRE_COPY request reached the kernel"


@pytest.mark.parametrize("phase", list(SOURCE_PHASES))
@pytest.mark.parametrize("cap", CAPS)
def test_source_rollback_from_each_phase(tmp_path: Path, paths: PathRecorder, cap: str,
                                         phase: str) -> None:
    src = Side.build(tmp_path, pair_spec(cap))
    try:
        s = src.driver()
        SOURCE_PHASES[phase](s, src)
        assert src.kernel_state() is expected_state(s, phase)
        assert s.rollback() is MigState.RUNNING
        assert s.state() is MigState.RUNNING and src.kernel_state() is MigState.RUNNING
        assert src.data_fds() == [] and s.phase is HookPhase.IDLE
        assert src.resets() == 0                   # the ladder's first rung was enough
        assert src.model.running
        assert s.rollback() is MigState.RUNNING    # again: nothing to do
        if cap != "v1" and src.transitions():
            assert paths.requests                  # the spy sees the v2 traffic
    finally:
        src.close()


def pair_spec(cap: str):  # noqa: ANN201
    from tests.support.driver_rig import spec_for
    return spec_for(cap)


@pytest.mark.parametrize("phase", ["load_setup", "some_chunks", "load_complete", "resumed"])
@pytest.mark.parametrize("cap", CAPS)
def test_destination_rollback_discards_by_reset(tmp_path: Path, paths: PathRecorder, cap: str,
                                                phase: str) -> None:
    src, dst = pair(tmp_path, cap)
    try:
        s, d = src.driver(), dst.driver()
        record, chunks = save(src, s)
        before = dst.model.digest()
        d.load_setup()
        if phase != "load_setup":
            for c in chunks[: max(1, len(chunks) // 2)] if phase == "some_chunks" else chunks:
                d.load_state(c)
        if phase in ("load_complete", "resumed"):
            d.load_complete()
        if phase == "resumed":
            d.resume()
        assert d.rollback() is MigState.RUNNING
        assert dst.kernel_state() is MigState.RUNNING and dst.data_fds() == []
        assert dst.resets() == 1
        assert dst.model.digest() != src.model.digest()    # nothing loaded survives
        assert before != src.model.digest()
        # and the source, cancelled after its stop-copy, runs again
        assert s.rollback() is MigState.RUNNING and src.kernel_state() is MigState.RUNNING
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("cap", CAPS)
def test_source_runs_again_after_rollback_and_changes(tmp_path: Path, paths: PathRecorder,
                                                      cap: str) -> None:
    src = Side.build(tmp_path, pair_spec(cap))
    try:
        s = src.driver()
        _completed(s, src)
        frozen = src.model.digest()
        assert src.model.tick(2) == 0                      # stopped: nothing changes
        s.rollback()
        assert src.model.tick(2) > 0 and src.model.digest() != frozen
        chunks: list[bytes] = []
        s.save_setup()                                     # and can migrate again
        s.save_live_complete_precopy(collect(chunks))
        assert chunks
        s.cleanup()
    finally:
        src.close()
