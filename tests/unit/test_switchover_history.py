"""Earlier switchovers correct what a migration cannot measure before its own: the
commit's waits, the final sync's one-off share, the devices' stop and the destination's
load (docs/architecture.md §4)."""

from __future__ import annotations

import pytest

from vfiod.migration.planning.breakdown import COMPONENTS
from vfiod.migration.planning.predictor import FixedCosts
from vfiod.migration.session import switchover_warm_up
from vfiod.migration.session.history import HostHistories, SwitchoverHistory, commit_line
from vfiod.migration.session.switchover_warm_up import (
    REHEARSED_RUNS,
    SwitchoverRehearsal,
    warm_switchover,
)
from vfiod.migration.stream.header import DeviceInfo

MEASURED = FixedCosts(device_stop_s=0.001, final_sync_s=0.010, commit_round_trips_s=0.0002,
                      dest_load_resume_s=0.0001)
#: uncorrected: 100 ms of RAM and 5 ms of device state over the link
PREDICTED = {"device_stop": 0.006, "final_sync": 0.010, "ram_transfer": 0.100,
             "verify": 0.0, "commit_round_trips": 0.0002, "dest_load_resume": 0.0001}


def _actual(**parts: float) -> dict[str, float]:
    base = {"device_stop": 0.006, "final_sync": 0.010, "ram_transfer": 0.100,
            "commit_round_trips": 0.0002, "dest_load_resume": 0.0001}
    return {c: parts.get(c, base.get(c, 0.0)) for c in COMPONENTS}


def _correct(h: SwitchoverHistory, device_bytes: int = 0) -> FixedCosts:
    return h.correct(MEASURED, device_bytes=device_bytes)


def test_no_history_no_correction() -> None:
    assert _correct(SwitchoverHistory(), 1 << 20) == MEASURED


def test_earlier_switchovers_correct_the_parts_measured_only_at_switchover() -> None:
    h = SwitchoverHistory()
    # the pre-copy sync paid a one-off (10 ms) the final sync did not (0.2 ms); the commit
    # took about 2 ms more than two header round trips
    for extra in (0.002, 0.0021, 0.0019):
        h.record(MEASURED, PREDICTED, _actual(final_sync=0.0002,
                                              commit_round_trips=0.0002 + extra), 0)
    got = _correct(h)
    assert h.migrations == 3
    assert got.final_sync_s == pytest.approx(0.0002)
    assert got.commit_round_trips_s == pytest.approx(0.0022)
    # what this migration measures itself is left as it is (the verify took what it
    # was predicted to)
    assert got.verify_s == MEASURED.verify_s


def test_device_stop_and_load_grow_with_the_state_they_carry() -> None:
    h = SwitchoverHistory()
    # stopping and loading cost 2 ms per MiB of device state beyond the arcs
    for mib in (1, 4, 8):
        extra = 0.002 * mib
        h.record(MEASURED, PREDICTED, _actual(device_stop=0.006 + extra,
                                              dest_load_resume=0.0001 + extra), mib << 20)
    big = _correct(h, 16 << 20)
    assert big.device_stop_s == pytest.approx(MEASURED.device_stop_s + 0.032)
    assert big.dest_load_resume_s == pytest.approx(MEASURED.dest_load_resume_s + 0.032)
    # nothing learnt yet for small states: their extra is not a cost per byte
    assert _correct(h, 64 << 10).device_stop_s == MEASURED.device_stop_s


def test_small_states_learn_the_extra_time_itself() -> None:
    """Below 1 MiB the extra over the predicted stop (pausing, the arcs' fixed cost) is
    kept in seconds, its median over the kept migrations, never a negative stop."""
    h = SwitchoverHistory()
    for extra in (0.004, 0.005, 0.006):
        h.record(MEASURED, PREDICTED, _actual(device_stop=0.006 + extra,
                                              dest_load_resume=0.0001 + extra / 2), 64 << 10)
    small, big = _correct(h, 256 << 10), _correct(h, 16 << 20)
    assert small.device_stop_s == pytest.approx(MEASURED.device_stop_s + 0.005)
    assert small.dest_load_resume_s == pytest.approx(MEASURED.dest_load_resume_s + 0.0025)
    assert big.device_stop_s == MEASURED.device_stop_s       # no large state seen yet
    quicker = SwitchoverHistory()
    quicker.record(MEASURED, PREDICTED, _actual(device_stop=0.0), 64 << 10)
    assert _correct(quicker, 64 << 10).device_stop_s == 0.0


def test_the_stream_end_is_learnt_into_the_final_pass() -> None:
    h = SwitchoverHistory()
    for end in (0.002, 0.010, 0.003):
        h.record(MEASURED, PREDICTED, _actual(), 0, stream_end_s=end)
    assert _correct(h).record_overhead_s == pytest.approx(MEASURED.record_overhead_s + 0.003)


def test_the_commit_correction_is_over_the_prediction_with_its_socket_queue() -> None:
    # the prediction already had 3 ms of queued stream in the commit's waits: an actual
    # commit of that length needs no correction, so the queue is not counted twice
    h = SwitchoverHistory()
    predicted = dict(PREDICTED, commit_round_trips=0.0002 + 0.003)
    h.record(MEASURED, predicted, _actual(commit_round_trips=0.0002 + 0.003), 0)
    assert _correct(h).commit_round_trips_s == pytest.approx(MEASURED.commit_round_trips_s)


def test_the_commit_correction_grows_with_the_final_pass_records() -> None:
    """The destination lands and folds a scattered final pass after the source sent it:
    pooled with passes of no records, a median put the sparse guest's 2 ms over on the
    tiny guest's commit and left the sparse one short. A line through (records, extra)
    gives each its own."""
    h = SwitchoverHistory()
    for records, extra in ((0, 0.0002), (60, 0.0020), (0, 0.0001), (70, 0.0023),
                           (8, 0.0004), (0, 0.0003)):
        h.record(MEASURED, PREDICTED, _actual(commit_round_trips=0.0002 + extra), 0,
                 final_records=records)
    base = MEASURED.commit_round_trips_s
    small = h.correct(MEASURED, device_bytes=0, records=0).commit_round_trips_s
    sparse = h.correct(MEASURED, device_bytes=0, records=65).commit_round_trips_s
    assert small - base == pytest.approx(0.0002, abs=0.0002)
    assert sparse - base == pytest.approx(0.00215, abs=0.0003)


def test_the_commit_line_is_robust_and_never_falls_with_more_records() -> None:
    assert commit_line([]) == (0.0, 0.0)
    # too few, or records too alike: the median alone
    assert commit_line([(0, 1.0), (50, 3.0)]) == (2.0, 0.0)
    assert commit_line([(10, 1.0), (12, 2.0), (14, 9.0)]) == (2.0, 0.0)
    # one stalled commit among a clean line does not bend it
    base, slope = commit_line([(0, 0.001), (10, 0.002), (20, 0.003), (30, 0.004),
                               (40, 0.5)])
    assert (base, slope) == (pytest.approx(0.001), pytest.approx(0.0001))
    # fewer-records-slower samples: slope 0, never negative
    assert commit_line([(0, 0.004), (20, 0.002), (40, 0.001)])[1] == 0.0


def test_one_stalled_commit_does_not_set_the_correction() -> None:
    h = SwitchoverHistory()
    for commit in (0.001, 0.001, 0.5):                 # one stalled commit among three
        h.record(MEASURED, PREDICTED, _actual(commit_round_trips=commit), 0)
    assert _correct(h).commit_round_trips_s == pytest.approx(0.001)


def test_a_history_without_a_stream_end_or_verify_takes_the_rehearsals() -> None:
    """A source's first switchover predicted its stream's end and verify as nothing; the
    rehearsal's times stand in until a switchover is learnt (``switchover_warm_up``)."""
    rehearsal = SwitchoverRehearsal(stream_end_s=0.004, verify_s=0.002)
    h = SwitchoverHistory()
    got = h.correct(MEASURED, device_bytes=0, rehearsal=rehearsal)
    assert got.record_overhead_s == pytest.approx(MEASURED.record_overhead_s + 0.004)
    assert got.verify_s == pytest.approx(MEASURED.verify_s + 0.002)
    # one switchover whose stream's end took 1 ms and whose verify took what was predicted
    h.record(MEASURED, PREDICTED, _actual(ram_transfer=0.101), 0, stream_end_s=0.001)
    got = h.correct(MEASURED, device_bytes=0, rehearsal=rehearsal)
    assert got.record_overhead_s == pytest.approx(MEASURED.record_overhead_s + 0.001)
    assert got.verify_s == pytest.approx(MEASURED.verify_s)


def test_with_nothing_learnt_a_stop_and_a_load_cost_at_least_the_setup_transition() -> None:
    """The arcs measured at every pass are pending queries; the setup arc is a real state
    change (RUNNING -> PRE_COPY), as the stop (-> STOP_COPY) and the destination's load
    (-> STOP -> RUNNING) are. With no switchover learnt, each is predicted to take at least
    the setup's (a fresh daemon predicted a 64 KiB state's stop at 0.1 ms, the queries',
    against 0.4-0.8 ms taken)."""
    h = SwitchoverHistory()
    for state in (64 << 10, 16 << 20):          # small and large states alike
        got = h.correct(MEASURED, device_bytes=state, transition_s=0.004)
        assert got.device_stop_s == pytest.approx(0.004)
        assert got.dest_load_resume_s == pytest.approx(0.004)
        # a setup quicker than the queries adds nothing
        assert h.correct(MEASURED, device_bytes=state, transition_s=0.0) == MEASURED
    # once a small state's stop and load are learnt, the lessons decide, not the setup
    h.record(MEASURED, PREDICTED, _actual(device_stop=0.007, dest_load_resume=0.0003),
             64 << 10)
    got = h.correct(MEASURED, device_bytes=64 << 10, transition_s=0.004)
    assert got.device_stop_s == pytest.approx(MEASURED.device_stop_s + 0.001)
    assert got.dest_load_resume_s == pytest.approx(MEASURED.dest_load_resume_s + 0.0002)
    # a large state has no per-byte lesson yet: still the setup transition
    big = h.correct(MEASURED, device_bytes=16 << 20, transition_s=0.004)
    assert big.device_stop_s == pytest.approx(0.004)


def test_a_setup_that_paid_a_one_off_counts_only_up_to_a_bound() -> None:
    """A second of first-call compilation inside the setup must not make every cold stop
    and load a second (tests/sim/test_session_convergence.py: it kept the migration in
    pre-copy): 5 ms plus 5 ms per MiB of state at most."""
    h = SwitchoverHistory()
    small = h.correct(MEASURED, device_bytes=64 << 10, transition_s=1.0)
    assert small.device_stop_s == pytest.approx(0.005 + 0.005 / 16)
    assert small.dest_load_resume_s == pytest.approx(0.005 + 0.005 / 16)
    big = h.correct(MEASURED, device_bytes=8 << 20, transition_s=1.0)
    assert big.device_stop_s == pytest.approx(0.045)
    # within the bound the setup counts whole
    assert h.correct(MEASURED, device_bytes=8 << 20,
                     transition_s=0.012).device_stop_s == pytest.approx(0.012)


def test_the_rehearsal_times_its_stream_end_and_verify() -> None:
    r = warm_switchover(timed=True)
    assert 0 < r.stream_end_s < 1 and 0 < r.verify_s < 1


def test_the_rehearsal_prices_a_run_of_a_scattered_pass_beyond_its_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # 128 single pages cost both ends per-run work (a record header, a landing, the CRCs'
    # bookkeeping) that one run of 128 pages does not. The price is the slower end's
    # extra per run, each end's best of the trials (times given here, not measured).
    times = iter([(0.004, 0.002), (0.001, 0.001),       # trial 1: single pages, one run
                  (0.003, 0.006), (0.002, 0.0015)])     # trial 2
    monkeypatch.setattr(switchover_warm_up, "_send_and_land",
                        lambda runs, src, dst: next(times))
    # send: 0.003 - 0.001; land: 0.002 - 0.001; the slower end's extra, per run
    assert switchover_warm_up._rehearse_runs() == pytest.approx(0.002 / REHEARSED_RUNS)
    monkeypatch.undo()
    r = warm_switchover(timed=True)                 # the real code round-trips its runs
    assert r.run_s >= 0 and r.figures()["rehearsed_run_s"] == r.run_s
    assert warm_switchover().run_s == 0.0           # untimed: the destination's warm-up


def test_broken_samples_are_not_lessons() -> None:
    h = SwitchoverHistory()
    # a clock jump: the sync 10 000 times what was measured
    h.record(MEASURED, PREDICTED, _actual(final_sync=100.0), 0)
    assert _correct(h).final_sync_s == MEASURED.final_sync_s


BIG = DeviceInfo("0000:01:00.0", "v2", 7, {"vendor": "0x1234", "device": "0xdma"})
UART = DeviceInfo("mdev-uuid", "v2", 7, {"mdev_type": "mtty-2"})


def _learn(h: SwitchoverHistory, commit_s: float) -> None:
    h.record(MEASURED, PREDICTED, _actual(commit_round_trips=commit_s), 48 << 20)


def test_a_guest_learns_from_its_own_devices_only() -> None:
    """The kernel tier's finding: half a second of commit learnt from a 48 MiB checksummed
    device state was added to a serial port's 96-byte migration, which then never
    predicted below its limit. Each guest shape keeps its own history."""
    hosts = HostHistories()
    learnt = hosts.of("g", [BIG])
    _learn(learnt, 0.5)
    assert _correct(hosts.of("g", [BIG])).commit_round_trips_s == pytest.approx(0.5)
    assert _correct(hosts.of("g", [UART])) == MEASURED       # another device
    assert _correct(hosts.of("h", [UART])) == MEASURED       # another guest, other devices
    assert hosts.of("g", [BIG]) is learnt


def test_a_guest_without_switchovers_borrows_from_the_last_guest_with_its_devices() -> None:
    """On a fleet host most guests migrate away once: a guest's first migration predicts
    with the lessons of the guest that switched over last with the same devices (ids
    other than the name: the same device model in another slot)."""
    hosts = HostHistories()
    _learn(hosts.of("a", [BIG]), 0.5)
    _learn(hosts.of("b", [BIG]), 0.2)                       # the last with these devices
    _learn(hosts.of("u", [UART]), 0.9)
    same_model = DeviceInfo("0000:02:00.0", "v2", 7, dict(BIG.identity))
    first = hosts.of("new", [same_model])
    assert _correct(first).commit_round_trips_s == pytest.approx(0.2)
    assert first.lessons() == {"history_switchovers": 1.0, "history_borrowed": 1.0}
    assert hosts.of("other", [BIG, UART]).lessons()["history_switchovers"] == 0  # not kin
    assert _correct(hosts.of("other", [BIG, UART])) == MEASURED


def test_a_guest_uses_its_own_lessons_once_it_has_one() -> None:
    hosts = HostHistories()
    kin = hosts.of("a", [BIG])
    for commit in (0.5, 0.5, 0.5):
        _learn(kin, commit)
    own = hosts.of("new", [BIG])
    _learn(own, 0.1)
    assert _correct(own).commit_round_trips_s == pytest.approx(0.1)
    assert own.lessons() == {"history_switchovers": 1.0, "history_borrowed": 0.0}
    # a lender is not held once it is not used: a daemon's guests would chain them all
    assert own.kin is None
    assert kin.migrations == 3                               # the lender is untouched
    assert _correct(kin).commit_round_trips_s == pytest.approx(0.5)


def test_a_guests_opted_out_rate_is_not_borrowed() -> None:
    """The opted-out containers' rate is the guest's own DMA, not its devices'."""
    hosts = HostHistories()
    kin = hosts.of("a", [BIG])
    kin.record_opted_out(512, 1024, 1.0)
    _learn(kin, 0.5)
    assert kin.opted_out_share(1.0) == pytest.approx(0.5)
    assert hosts.of("new", [BIG]).opted_out_share(1.0) is None


def test_the_shapes_kept_are_bounded() -> None:
    hosts = HostHistories(shapes=2)
    first = hosts.of("a", [])
    hosts.of("b", [])
    hosts.of("c", [])
    assert hosts.of("a", []) is not first                    # the oldest was dropped


def test_opted_out_containers_learn_nothing_until_a_stop_and_copy_query_was_seen() -> None:
    h = SwitchoverHistory()
    assert h.opted_out_share(0.5) is None            # nothing learnt: the sample decides
    # 1,000 of 10,000 mapped pages written in 2 s of tracking: 5% of the mapping a second
    h.record_opted_out(1000, 10_000, 2.0)
    assert h.opted_out_share(0.5) == pytest.approx(0.025)
    assert h.opted_out_share(100.0) == 1.0          # never more than the whole mapping
    # a slower migration's lower rate does not lower the bound: the largest rate counts
    h.record_opted_out(1000, 10_000, 20.0)
    assert h.opted_out_share(1.0) == pytest.approx(0.05)
    h.record_opted_out(0, 0, 1.0)                   # no opted-out container: no lesson
    h.record_opted_out(5, 10, 0.0)                  # no time tracked: no rate
    assert h.opted_out_share(1.0) == pytest.approx(0.05)


def test_the_final_pass_learns_its_time_per_record_beyond_the_prediction() -> None:
    h = SwitchoverHistory()
    # each final pass of 16 records took 1 ms more than its bytes, its framing CPU and its
    # stream's end (0.2 ms) say: about 62 us per record
    for _ in range(3):
        h.record(MEASURED, PREDICTED, _actual(ram_transfer=0.100 + 0.0002 + 0.001), 0,
                 stream_end_s=0.0002, final_records=16)
    got = h.correct(MEASURED, device_bytes=0, records=32)
    assert got.record_overhead_s == pytest.approx(MEASURED.record_overhead_s + 0.0002
                                                  + 0.001 * 32 / 16)
    # no records predicted, nothing added beyond the stream's end
    assert h.correct(MEASURED, device_bytes=0).record_overhead_s == pytest.approx(0.0002)


def test_a_final_pass_without_records_or_with_a_broken_clock_teaches_nothing() -> None:
    h = SwitchoverHistory()
    h.record(MEASURED, PREDICTED, _actual(ram_transfer=0.5), 0, final_records=0)
    h.record(MEASURED, PREDICTED, _actual(ram_transfer=5.0), 0, final_records=4)
    assert h.correct(MEASURED, device_bytes=0, records=1000).record_overhead_s == 0.0


def test_the_verify_learns_what_the_digests_fold_and_compare_add() -> None:
    h = SwitchoverHistory()
    for extra in (0.00012, 0.00015, 0.00013):
        h.record(MEASURED, PREDICTED, _actual(verify=extra), 0)
    assert h.correct(MEASURED, device_bytes=0).verify_s == pytest.approx(0.00013)
