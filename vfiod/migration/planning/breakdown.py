"""The downtime, part by part: what the prediction said each part would cost and what it
did cost, so an operator sees which part was wrong (docs/architecture.md §4).

Pure code (numbers in, numbers out). The parts, in the order they happen once the guest
pauses (``COMPONENTS``, also the bounded ``component`` label of the metrics):

    device_stop         pause, P2P quiesce, the devices' state arcs and their stop-copy
                        bytes over the link
    final_sync          the last dirty sync
    ram_transfer        the RAM still dirty, over the link, with its per-record CPU cost
    verify              the final re-hash of the live-sent pages not read since (the
                        stop-and-copy records' and the destination's pages carry the
                        stream's CRCs, docs/protocol.md §7.3), and the destination's
                        compare
    journal             the switchover's durable records, inside the downtime: the
                        destination's "prepared" and "resumed", the source's decision to
                        commit (docs/architecture.md §1.7), each fsynced; predicted at
                        the time the source's journal takes per record
    commit_round_trips  the waits for the destination: the stream's tail arriving (the
                        bytes queued in the source's socket, predicted at the bandwidth)
                        and landing (a page its memory never held faults first,
                        ``session/first_touch.py``), PREPARED, COMMIT, RESUMED (two round
                        trips, docs/protocol.md §8.4)
    dest_load_resume    the destination's devices loading their final state and resuming

``predicted_parts`` splits a ``Prediction`` by its ``FixedCosts``; ``actual_parts`` takes
the source's measured intervals and the destination's reported ones, and gives the
commit round trips what is left of the measured downtime, so the actual parts add up to
the actual downtime.
"""

from __future__ import annotations

from vfiod.migration.planning.predictor import FixedCosts, Prediction

COMPONENTS = ("device_stop", "final_sync", "ram_transfer", "verify", "journal",
              "commit_round_trips", "dest_load_resume")


def predicted_parts(p: Prediction, costs: FixedCosts) -> dict[str, float]:
    """Each part of ``p.downtime_s`` (they add up to it)."""
    bw = p.bandwidth_bps
    # a paced link's ready bytes go first, and the devices' stop-copy data goes first
    dev_ready = min(p.ready_bytes, p.device_bytes)
    ram_ready = min(p.ready_bytes - dev_ready, p.ram_bytes)
    return {"device_stop": costs.device_stop_s + (p.device_bytes - dev_ready) / bw,
            "final_sync": costs.final_sync_s,
            "ram_transfer": (p.ram_bytes - ram_ready) / bw + costs.record_overhead_s,
            "verify": costs.verify_s,
            "journal": costs.journal_s,
            "commit_round_trips": costs.commit_round_trips_s + p.queued_bytes / bw,
            "dest_load_resume": costs.dest_load_resume_s}


def actual_parts(downtime_s: float, *, device_stop_s: float, final_sync_s: float,
                 ram_transfer_s: float, verify_s: float, dest_load_resume_s: float,
                 journal_s: float = 0.0) -> dict[str, float]:
    """The measured parts; ``commit_round_trips`` is the rest of ``downtime_s`` (never
    below zero: clocks of two ends do not subtract exactly)."""
    parts = {"device_stop": device_stop_s, "final_sync": final_sync_s,
             "ram_transfer": ram_transfer_s, "verify": verify_s, "journal": journal_s,
             "dest_load_resume": dest_load_resume_s}
    for name, v in parts.items():
        if v < 0:
            raise ValueError(f"measured {name} is negative: {v}")
    rest = max(0.0, downtime_s - sum(parts.values()))
    return {c: rest if c == "commit_round_trips" else parts[c] for c in COMPONENTS}


def breakdown(predicted: dict[str, float], actual: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{component: {"predicted_s", "actual_s"}}`` for the result and ``ctl status``."""
    return {c: {"predicted_s": predicted[c], "actual_s": actual[c]} for c in COMPONENTS}
