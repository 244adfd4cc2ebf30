"""What a final pass costs beyond its bytes over the link (session/phases.py
``final_pass_overheads``, docs/architecture.md §4): the framing CPU of its records and
the rehearsed extra of each run, counted where they exceed the link's time."""

from __future__ import annotations

from typing import Any, cast

import pytest

from vfiod.migration.session.digest import RamDigests
from vfiod.migration.session.phases import PredictionNumbers, RamSender, final_pass_overheads

MB = 1_000_000


class _Fit:
    def __init__(self, per_byte: float, per_item: float) -> None:
        self.per = (per_byte, per_item)

    def fit(self) -> tuple[float, float]:
        return self.per


class _Costs:
    """A digest table with nothing pending, a sender with the given CPU costs."""

    def __init__(self, per_byte: float = 0.0, per_record: float = 0.0) -> None:
        self.cost = _Fit(per_byte, per_record)
        self.pending_pages, self.page_size = 0, 4096

    def pending_runs(self) -> int:
        return 0


def _overheads(runs: int, bandwidth_bps: float, run_s: float, paced: bool = True,
               **cpu: Any) -> float:
    num = PredictionNumbers(dirty_ram_bytes=runs * 4096, dirty_runs=runs, dirty_records=1,
                            measured_dirty_bytes=0, device_stopcopy_bytes=0,
                            device_precopy_bytes=0, tracking=True)
    costs = _Costs(**cpu)
    return final_pass_overheads(num, cast(RamDigests, _Costs()), cast(RamSender, costs),
                                bandwidth_bps, run_s, paced=paced)[1]


def test_a_scattered_final_pass_costs_its_runs_beyond_the_bulk_rate() -> None:
    # 4,000 single pages at 5 us a run: 20 ms of CPU where the link takes 1.6 ms (10 GB/s)
    assert _overheads(4000, 10_000 * MB, 5e-6) == pytest.approx(0.020 - 0.0016384)
    assert _overheads(4000, 10_000 * MB, 0.0) == 0.0          # no rehearsal: bytes only


def test_a_slow_paced_link_hides_the_runs_cost() -> None:
    # at 10 MB/s the same pass is 1.6 s on the wire: the CPU works while it waits
    assert _overheads(4000, 10 * MB, 5e-6) == 0.0


def test_on_an_unpaced_link_the_runs_cost_adds_to_the_bulk_rate() -> None:
    # an unpaced link's bandwidth is what the first pass's bulk reached, bound by the two
    # ends' CPU: a scattered pass's per-run work comes on top, however slow that was
    assert _overheads(4000, 10 * MB, 5e-6, paced=False) == pytest.approx(0.020)
    assert _overheads(4000, 10_000 * MB, 5e-6, paced=False) == pytest.approx(0.020)


def test_the_runs_add_to_the_framing_cpu() -> None:
    got = _overheads(1000, 10_000 * MB, 2e-6, per_byte=1e-9, per_record=1e-3)
    assert got == pytest.approx(1000 * 4096 * 1e-9 + 1e-3 + 1000 * 2e-6 - 4096 * 1000 / 1e10)
