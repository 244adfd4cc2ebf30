"""The line-protocol run-state backend against a VMM written here
(docs/runstate-protocol.md, docs/architecture.md §8.2)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.runstate_vmm import LineVmm
from vfiod.daemon.runstate import LineRunState, RunStateBackend, RunStateError


@pytest.fixture
def vmm_factory(tmp_path: Path) -> Iterator:
    made: list[LineVmm] = []

    def make(behaviour: str = "good") -> LineVmm:
        vmm = LineVmm(tmp_path / f"vmm{len(made)}.sock", behaviour)
        made.append(vmm)
        return vmm

    yield make
    for v in made:
        v.close()


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_pause_resume_status_are_acknowledged(vmm_factory) -> None:
    vmm = vmm_factory()
    backend = LineRunState(vmm.path)
    assert isinstance(backend, RunStateBackend)
    st = backend.pause(soon())
    assert (st.running, st.state, vmm.running) == (False, "paused", False)
    assert backend.status(soon()).running is False
    st = backend.resume(soon())
    assert (st.running, vmm.running) == (True, True)
    assert [r["op"] for r in vmm.requests] == ["pause", "status", "resume"]
    assert all(r["runstate"] == 1 and 0 < r["timeout_ms"] <= 5000 for r in vmm.requests)
    assert len({r["id"] for r in vmm.requests}) == 3


def test_a_vmm_that_does_not_answer_fails_the_pause_at_its_deadline(vmm_factory) -> None:
    vmm = vmm_factory("silent")
    began = time.monotonic()
    with pytest.raises(RunStateError) as e:
        LineRunState(vmm.path).pause(began + 0.5)
    assert e.value.kind == "timeout"
    assert "acknowledgement of pause: no answer before the deadline" in str(e.value)
    assert vmm.path in str(e.value)
    assert 0.5 <= time.monotonic() - began < 3.0


@pytest.mark.parametrize(("behaviour", "kind", "words"), [
    ("refuse", "refused", "the VMM refused: vCPUs are being reset"),
    ("lie", "protocol", "acknowledged, but the VMM says its vCPUs are 'running'"),
    ("wrong-id", "protocol", "the answer must echo runstate 1 and id 1"),
])
def test_a_bad_answer_fails_the_pause_saying_why(vmm_factory, behaviour: str, kind: str,
                                                  words: str) -> None:
    vmm = vmm_factory(behaviour)
    with pytest.raises(RunStateError) as e:
        LineRunState(vmm.path).pause(soon())
    assert e.value.kind == kind
    assert words in str(e.value)


def test_no_vmm_at_the_socket_is_a_connect_error(tmp_path: Path) -> None:
    with pytest.raises(RunStateError) as e:
        LineRunState(str(tmp_path / "nobody.sock")).status(soon())
    assert e.value.kind == "connect"
    assert "ENOENT" in str(e.value)


def test_a_deadline_already_past_asks_nothing(vmm_factory) -> None:
    vmm = vmm_factory()
    with pytest.raises(RunStateError) as e:
        LineRunState(vmm.path).pause(time.monotonic() - 1)
    assert e.value.kind == "timeout"
    assert vmm.requests == [] and vmm.running
