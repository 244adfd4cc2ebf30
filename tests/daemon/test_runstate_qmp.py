"""The QMP run-state backend against a real QEMU (docs/architecture.md §8.2; QEMU is in
.ci/deps, so this never skips)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.runstate_vmm import QemuQmp
from vfiod.daemon.runstate import QmpRunState, RunStateBackend, RunStateError


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[QemuQmp]:
    q = QemuQmp(tmp_path / "qmp.sock")
    yield q
    q.close()


def soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


def test_stop_cont_and_query_status_with_their_events(qemu: QemuQmp) -> None:
    backend = QmpRunState(qemu.path)
    assert isinstance(backend, RunStateBackend)
    first = backend.status(soon())
    assert (first.running, first.state) == (False, "prelaunch")
    st = backend.resume(soon())
    assert (st.running, st.state, st.events) == (True, "running", ("RESUME",))
    st = backend.pause(soon())
    assert (st.running, st.state, st.events) == (False, "paused", ("STOP",))
    again = backend.pause(soon())          # already paused: acknowledged, no event
    assert (again.running, again.events) == (False, ())
    assert backend.resume(soon()).running


def test_a_client_holding_the_qmp_socket_fails_the_pause_naming_the_cause(
        qemu: QemuQmp) -> None:
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.connect(qemu.path)
    try:
        with pytest.raises(RunStateError) as e:
            QmpRunState(qemu.path).pause(time.monotonic() + 1.0)
        assert e.value.kind == "timeout"
        assert "one client per QMP socket" in str(e.value)
        assert "give vfiod its own -qmp socket" in str(e.value)
    finally:
        other.close()
    assert QmpRunState(qemu.path).status(soon()).state == "prelaunch"


def test_a_qemu_that_does_not_answer_in_time_fails_the_pause(qemu: QemuQmp) -> None:
    backend = QmpRunState(qemu.path)
    backend.resume(soon())
    qemu.freeze()                  # a wedged VMM: the kernel still accepts
    began = time.monotonic()
    try:
        with pytest.raises(RunStateError) as e:
            backend.pause(began + 0.5)
        assert e.value.kind == "timeout"
        assert 0.5 <= time.monotonic() - began < 3.0
    finally:
        qemu.thaw()
    assert backend.status(soon()).running    # the failed pause stopped nothing


def test_an_answer_left_over_from_an_earlier_client_is_skipped_before_the_greeting(
        tmp_path: Path) -> None:
    # QEMU writes an answer whose client gave up to its next client, before the greeting
    path = tmp_path / "qmp.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    asked: list[str] = []

    def monitor() -> None:
        conn, _ = srv.accept()
        with conn, conn.makefile("rwb") as f:
            f.write(b'{"return": {}, "id": 27}\n')
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            for line in f:
                req = json.loads(line)
                asked.append(req["execute"])
                ret = {"running": True, "status": "running"} \
                    if req["execute"] == "query-status" else {}
                f.write(json.dumps({"return": ret, "id": req["id"]}).encode() + b"\n")
                f.flush()

    t = threading.Thread(target=monitor, daemon=True)
    t.start()
    try:
        assert QmpRunState(str(path)).status(soon()).running
        assert asked == ["qmp_capabilities", "query-status"]
    finally:
        t.join(timeout=5)
        srv.close()


def test_a_socket_that_is_not_qmp_is_a_protocol_error(tmp_path: Path) -> None:
    # a wrong path in the configuration: something answers, but not QEMU
    wrong = tmp_path / "not-qmp.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(wrong))
    srv.listen(1)

    def greet_wrong() -> None:
        conn, _ = srv.accept()
        conn.sendall(b'{"hello": "not qmp"}\n')
        conn.close()

    t = threading.Thread(target=greet_wrong, daemon=True)
    t.start()
    try:
        with pytest.raises(RunStateError) as e:
            QmpRunState(str(wrong)).status(soon())
        assert e.value.kind == "protocol" and "not a QMP greeting" in str(e.value)
    finally:
        t.join(timeout=5)
        srv.close()
