"""``status`` answers spliced from kept pieces (``daemon/status_pieces.py``, docs/benchmarks.md
§2): the text is byte for byte what encoding the whole answer gives; a guest that
did not change is not encoded again; and every change the registry's writers make, in
place or not, shows in the next answer, whether that answer is about every guest or one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest

from vfiod.api.schema import Response, compact_json
from vfiod.daemon.config import GuestConfig, RamConfig
from vfiod.daemon.lifecycle import LifecycleState
from vfiod.daemon.registry import DeviceEntry, Registry
from vfiod.daemon.status_pieces import StatusPieces

DAEMON = {"version": "1", "uptime_s": 1.5, "name": "h\u00e9"}
OBSERVED = [{"name": "0000:01:00.0", "age_s": 0.25}]


def _registry() -> Registry:
    reg = Registry(clock=lambda: 1000.0)
    for name in ("g1", "g2", "g3"):
        e = reg.add_guest(GuestConfig(name, (RamConfig("ram0", 0, 1 << 20),)))
        for i in range(2):
            e.devices[f"d{i}"] = DeviceEntry(f"d{i}", name, "c0", protocol="v2",
                                             capabilities=["STOP_COPY", "PRE_COPY"],
                                             state=2, state_label="RUNNING",
                                             migratable=True, reason="ok \u2713")
        reg.lifecycle.move(name, LifecycleState.CLAIMED, "opened")
        reg.lifecycle.move(name, LifecycleState.RUNNING, "runs here")
    return reg


def _answer(pieces: StatusPieces, reg: Registry, only: str | None = None
            ) -> dict[str, Any]:
    """The answer, checked against the whole answer encoded at once from a fresh copy."""
    guests, finished = reg.status_rows(only)
    got = pieces.answer(dict(DAEMON), guests, finished, list(OBSERVED), only)
    fresh_guests, fresh_finished = reg.status_rows(only)
    whole = {"daemon": DAEMON, "guests": fresh_guests, "finished": fresh_finished,
             "observed": OBSERVED}
    assert got.encoded == compact_json(whole)
    assert Response.success(3, got).encode() == Response.success(3, whole).encode()
    assert json.loads(got.encoded) == whole == got
    return whole


def test_the_spliced_text_is_the_whole_answer_encoded_at_once() -> None:
    reg = _registry()
    pieces = StatusPieces()
    for only in (None, "g2", None, "g2"):
        _answer(pieces, reg, only)


def test_a_guest_that_did_not_change_is_not_encoded_again() -> None:
    reg = _registry()
    pieces = StatusPieces()
    _answer(pieces, reg)
    assert pieces.encoded == 4              # three guests and the finished list
    _answer(pieces, reg)
    _answer(pieces, reg, "g1")              # one guest's piece is the same piece
    assert pieces.encoded == 5              # only g1's finished list, its own scope
    reg.guests["g2"].devices["d1"].state_label = "STOP"
    _answer(pieces, reg)
    assert pieces.encoded == 6              # g2 alone


def _move(reg: Registry) -> None:
    reg.lifecycle.move("g1", LifecycleState.FAILED, "the device went away")


def _device_field(reg: Registry) -> None:
    reg.guests["g1"].devices["d0"].pre_copy_dirty_page_tracking = False


def _device_list_in_place(reg: Registry) -> None:
    reg.guests["g1"].devices["d0"].capabilities.append("P2P")


def _devices_replaced(reg: Registry) -> None:
    e = reg.guests["g1"]
    e.devices = {"d9": DeviceEntry("d9", "g1", "c0")}


def _note_in_place(reg: Registry) -> None:
    reg.guests["g1"].notes.append("recovered after a restart")


def _unsettled(reg: Registry) -> None:
    reg.guests["g1"].unsettled = {"peer": "h:1", "last_answer": None}


def _same_value_once_more(reg: Registry) -> None:
    # a write that changes nothing: the answer is the same, and still right
    reg.guests["g1"].devices["d0"].state = 2


@pytest.mark.parametrize("change", [_move, _device_field, _device_list_in_place,
                                    _devices_replaced, _note_in_place, _unsettled,
                                    _same_value_once_more])
@pytest.mark.parametrize("only", [None, "g1"])
def test_every_change_shows_in_the_next_answer(change: Callable[[Registry], None],
                                               only: str | None) -> None:
    reg = _registry()
    pieces = StatusPieces()
    before = _answer(pieces, reg, only)
    _answer(pieces, reg, None if only else "g1")   # the other scope kept too
    change(reg)
    after = _answer(pieces, reg, only)              # equal to a fresh copy: not stale
    assert (after == before) is (change is _same_value_once_more)


def test_a_migration_shows_at_every_step_and_its_guest_is_encoded_each_time() -> None:
    reg = _registry()
    pieces = StatusPieces()
    _answer(pieces, reg)
    rec = reg.begin_migration("g1", "source", "h:1", downtime_limit_ms=300.0)
    seen = _answer(pieces, reg)["guests"][0]["migration"]
    assert seen["state"] == "setup" and seen["result"] is None
    encoded = pieces.encoded
    _answer(pieces, reg)                            # running: encoded, never kept
    assert pieces.encoded == encoded + 1
    reg.update(rec, state="active", iteration=2, ram_sent_bytes=5)
    assert _answer(pieces, reg, "g1")["guests"][0]["migration"]["progress"][
        "ram_sent_bytes"] == 5
    reg.finish(rec, "completed", downtime_s=0.01, predicted_s=0.02, verified=True,
               downtime_share={"total_s": 0.001})
    done = _answer(pieces, reg)
    assert done["guests"][0]["migration"]["result"] == "completed"
    assert [m["id"] for m in done["finished"]] == [rec.id]
    with reg.lock:                                  # the warnings come after the finish
        rec.warnings = ["a warning"]
    for only in (None, "g1"):
        shown = _answer(pieces, reg, only)
        assert shown["finished"][0]["warnings"] == ["a warning"]
        assert shown["guests"][0]["migration"]["warnings"] == ["a warning"]
    encoded = pieces.encoded
    _answer(pieces, reg)                            # finished: kept again
    assert pieces.encoded == encoded


def test_a_running_migration_with_live_figures_is_never_reused() -> None:
    reg = _registry()
    pieces = StatusPieces()
    reg.begin_migration("g1", "source", "h:1")
    for throughput in (1.0, 2.0):
        guests, finished = reg.status_rows()
        guests[0]["migration"]["live"] = {"throughput_bps": throughput}
        got = pieces.answer(DAEMON, guests, finished, [])
        assert json.loads(got.encoded)["guests"][0]["migration"]["live"] == {
            "throughput_bps": throughput}


def test_a_device_copy_holds_its_fields_in_their_order_and_nothing_shared() -> None:
    dev = _registry().guests["g1"].devices["d0"]
    dev.state, dev.reason, dev.capabilities = 3, "changed", ["STOP_COPY"]
    copy = dev.to_json()
    assert list(copy) == [f.name for f in dataclasses.fields(DeviceEntry)]
    assert copy == dataclasses.asdict(dev)
    copy["capabilities"].append("P2P")
    assert dev.capabilities == ["STOP_COPY"]
