"""What keeps ``status`` cheap under load (README "Load"): requests that arrive while an
answer is built share it (``daemon/status_builds.py``), never one copied before they
arrived; the shared answer is encoded once (``EncodedResult``) into the same line a plain
result gives; the registry's hand-made copies hold every field ``dataclasses.asdict``
would; one guest's snapshot holds only that guest."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from tests.support.daemons import wait_until
from vfiod.api.schema import MAX_DEPTH, EncodedResult, Request, Response
from vfiod.daemon.config import GuestConfig, RamConfig
from vfiod.daemon.registry import DeviceEntry, Registry
from vfiod.daemon.status_builds import StatusBuilds


class GatedBuild:
    """A build that stops at a gate, before or after its copy, until the test opens it."""

    def __init__(self, copy_first: bool) -> None:
        self.copy_first = copy_first
        self.started = threading.Event()
        self.gate = threading.Event()
        self.calls = 0

    def __call__(self, copied: object) -> dict[str, object]:
        self.calls += 1
        n = self.calls
        if self.copy_first:
            copied()                        # type: ignore[operator]
        self.started.set()
        self.gate.wait(10)
        if not self.copy_first:
            copied()                        # type: ignore[operator]
        return {"build": n}


def _get_in_thread(builds: StatusBuilds, out: list[object]) -> threading.Thread:
    t = threading.Thread(target=lambda: out.append(builds.get()))
    t.start()
    return t


def test_a_request_arriving_before_the_copy_shares_that_build() -> None:
    build = GatedBuild(copy_first=False)
    builds = StatusBuilds(build)
    out: list[object] = []
    first = _get_in_thread(builds, out)
    assert build.started.wait(10)
    second = _get_in_thread(builds, out)
    wait_until(lambda: builds.shared == 1, 10, "the second request to join the build")
    build.gate.set()
    first.join(10)
    second.join(10)
    assert build.calls == 1
    assert out == [{"build": 1}, {"build": 1}] and out[0] is out[1]


def test_a_request_arriving_after_the_copy_builds_its_own() -> None:
    build = GatedBuild(copy_first=True)
    builds = StatusBuilds(build)
    out: list[object] = []
    first = _get_in_thread(builds, out)
    assert build.started.wait(10)
    second = _get_in_thread(builds, out)
    wait_until(lambda: build.calls == 2, 10, "the second request's own build")
    build.gate.set()
    first.join(10)
    second.join(10)
    assert builds.shared == 0 and sorted(o["build"] for o in out) == [1, 2]  # type: ignore[index]


def test_one_request_at_a_time_shares_nothing() -> None:
    calls = []
    builds = StatusBuilds(lambda copied: (copied(), calls.append(1), {"n": len(calls)})[2])
    assert [builds.get()["n"] for _ in range(3)] == [1, 2, 3]
    assert builds.shared == 0


def test_a_failed_build_fails_its_joiners_and_the_next_request_builds_anew() -> None:
    gate, started = threading.Event(), threading.Event()
    attempts: list[int] = []

    def build(copied: object) -> dict[str, object]:
        attempts.append(1)
        if len(attempts) == 1:
            started.set()
            gate.wait(10)
            raise RuntimeError("registry copy failed")
        return {"ok": True}
    builds = StatusBuilds(build)
    errors: list[BaseException] = []

    def get() -> None:
        try:
            builds.get()
        except RuntimeError as e:
            errors.append(e)
    threads = [threading.Thread(target=get)]
    threads[0].start()
    assert started.wait(10)
    threads.append(threading.Thread(target=get))
    threads[1].start()
    wait_until(lambda: builds.shared == 1, 10, "the joiner")
    gate.set()
    for t in threads:
        t.join(10)
    assert [str(e) for e in errors] == ["registry copy failed"] * 2
    assert builds.get() == {"ok": True}


@pytest.mark.parametrize("rid", [7, "abc", None])
def test_an_encoded_result_gives_the_same_line_as_a_plain_one(rid: object) -> None:
    value = {"guests": [{"name": "g\u00e9", "devices": [1, 2.5, None, True]}], "x": {}}
    spliced = Response.success(rid, EncodedResult(value)).encode()   # type: ignore[arg-type]
    assert spliced == Response.success(rid, value).encode()          # type: ignore[arg-type]
    assert Response.decode(spliced).result == value


def test_a_shallow_request_with_many_brackets_is_still_accepted() -> None:
    line = Request("status", {f"k{i}": [] for i in range(MAX_DEPTH + 5)}, 1).encode()
    assert Request.decode(line).args[f"k{MAX_DEPTH}"] == []


def _registry_with_a_migration() -> Registry:
    reg = Registry(clock=lambda: 1000.0)
    for name in ("g1", "g2"):
        e = reg.add_guest(GuestConfig(name, (RamConfig("ram0", 0, 1 << 20),)))
        e.devices["d0"] = DeviceEntry("d0", name, "c0", protocol="v2",
                                      capabilities=["STOP_COPY", "PRE_COPY"], migratable=True)
    rec = reg.begin_migration("g1", "source", "h:1", downtime_limit_ms=300.0)
    reg.update(rec, state="active", iteration=2, ram_sent_bytes=5)
    rec.warnings.append("a warning")
    reg.finish(rec, "completed", downtime_s=0.01, predicted_s=0.02, verified=True,
               downtime_share={"total_s": 0.001})
    return reg


def test_the_hand_made_copies_hold_what_asdict_would_and_are_copies() -> None:
    reg = _registry_with_a_migration()
    rec = reg.finished[0]
    assert rec.to_json() == dataclasses.asdict(rec)
    dev = reg.guests["g1"].devices["d0"]
    assert dev.to_json() == dataclasses.asdict(dev)
    copy = rec.to_json()
    copy["warnings"].append("x")
    copy["progress"]["iteration"] = 99
    copy["downtime_share"]["total_s"] = 5.0
    dev.to_json()["capabilities"].append("x")
    assert rec.warnings == ["a warning"] and rec.progress.iteration == 2
    assert rec.downtime_share == {"total_s": 0.001} and dev.capabilities[-1] == "PRE_COPY"


def test_a_snapshot_of_one_guest_holds_only_that_guest() -> None:
    reg = _registry_with_a_migration()
    one = reg.snapshot(only="g2")
    assert [g["name"] for g in one["guests"]] == ["g2"] and one["finished"] == []
    assert [m["guest"] for m in reg.snapshot(only="g1")["finished"]] == ["g1"]
    assert [g["name"] for g in reg.snapshot()["guests"]] == ["g1", "g2"]
