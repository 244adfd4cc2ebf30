"""A final pass of pages the source never sent lands on destination memory that never held
them, one fault each, and the commit waits for it: the destination prices a fault in its
HELLO, the source counts the pages and predicts them (session/first_touch.py;
docs/architecture.md §4; docs/protocol.md §8.2)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vfiod.migration.session.dest as dest_session
from tests.support.session_rig import (
    MiB,
    Run,
    Side,
    SideContainer,
    assert_migrated,
    assert_rolled_back,
    migrate,
    pair,
    spec,
)
from vfiod.migration.session.source import SourceSession
from vfiod.vfio import RamRegion

PAGES = 32


def _pages(src: Side, *, holding_data: bool) -> list[int]:
    """``PAGES`` guest-physical addresses, spread over the RAM, of pages that hold data
    (the first pass sends them) or are holes (it skips them)."""
    ram = np.frombuffer(src.guest.ram[0].view(), dtype=np.uint64).reshape(-1, 512)
    pages = np.flatnonzero(ram.any(axis=1) == holding_data)
    return [int(p) * 4096 for p in pages[:: len(pages) // PAGES][:PAGES]]


def _write_during_pass_1(src: Side, device: str, gpas: list[int]
                         ) -> Callable[[SourceSession], None]:
    """``on_source``: the device writes a few bytes at each of ``gpas`` once pass 1's RAM
    went, so the first prediction sees their pages dirty, and the final pass sends them."""
    def on_source(s: SourceSession) -> None:
        drv = s.guest.devices[0].driver
        real = drv.save_live_iterate
        done: list[bool] = []

        def iterate(*args: Any) -> Any:
            if not done:
                done.append(True)
                for gpa in gpas:              # iova = guest-physical (docs/kernel-contract.md §3.7)
                    src.host.device(device).dma_write(gpa, 8, b"\x5a" * 8)
            return real(*args)
        drv.save_live_iterate = iterate       # type: ignore[method-assign]
    return on_source


def _migrate_writing(tmp_path: Path, *, into_data: bool) -> Run:
    """A 64 MiB guest with 1 MiB of data, whose device writes ``PAGES`` pages during
    pass 1: pages that held data (the first pass sent them) or holes (it skipped them)."""
    dev = spec("v2_precopy_log")
    src, dst = pair(tmp_path, [SideContainer([dev])], ram=(RamRegion("ram", 0, 64 * MiB),),
                    fill_bytes=1 * MiB)
    try:
        pages = _pages(src, holding_data=into_data)
        run = migrate(src, dst, on_source=_write_during_pass_1(src, dev.name, pages))
        assert_migrated(src, dst, run)
        return run
    finally:
        src.close()
        dst.close()


def test_the_commits_prediction_counts_the_pages_the_destination_never_held(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The destination said a fault costs 200 µs a page (a slow host; this one takes a few):
    # the final pass's 32 pages the source never sent are 6.4 ms of its commit. Before, no
    # prediction counted them: a sparse guest's first commit came in long.
    price = 2e-4
    monkeypatch.setattr(dest_session, "measure_first_touch_s", lambda *a: price)
    run = _migrate_writing(tmp_path, into_data=False)
    r = run.source
    assert r.iterations == 1 and r.history[-1].decision == "switchover"
    t = r.timings
    assert t["first_touch_pages"] == PAGES
    assert t["predicted_first_touch_s"] == pytest.approx(PAGES * price)
    assert r.downtime_breakdown["commit_round_trips"]["predicted_s"] >= PAGES * price
    assert run.dest is not None and run.dest.timings["first_touch_s"] == price


def test_pages_the_first_pass_sent_are_not_counted(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # the same writes, but into pages that held data: the destination holds them already
    monkeypatch.setattr(dest_session, "measure_first_touch_s", lambda *a: 2e-4)
    run = _migrate_writing(tmp_path, into_data=True)
    assert run.source.timings["first_touch_pages"] == 0
    assert run.source.timings["predicted_first_touch_s"] == 0.0


def test_a_hello_with_a_price_that_is_no_number_is_refused_and_nothing_moves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dest_session, "measure_first_touch_s", lambda *a: "fast")
    src, dst = pair(tmp_path, [SideContainer([spec("v2_precopy_log")])])
    try:
        before = src.ram_digest()
        run = migrate(src, dst)
        assert_rolled_back(src, dst, run, before)
        assert "first_touch_s 'fast'" in run.source.reason
    finally:
        src.close()
        dst.close()
