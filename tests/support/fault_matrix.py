"""Running one fault-matrix case and judging it (issue 10 item 6; docs/architecture.md §1
steps 5-8): after a fault, the restarts and any automatic resolution, exactly one host
runs the guest, or none and one holds it paused with its outcome unknown (it can still
resume it); the running (or paused) side's RAM is the source's at the pause; the
journals name the migration.

``settle`` polls both hosts until the guest's states are stable and no migration of it
runs (or ``SETTLE_S`` passes: an unsettled case is judged as it stands). ``judge`` returns
a ``Verdict`` whose ``cell`` goes in the table; ``Verdict.check`` fails the test with
every problem named.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.support import fault_table
from tests.support.daemons import wait_until
from tests.support.fault_link import Fault, FaultPlan, Point
from tests.support.fault_proxy import FaultProxy
from tests.support.fault_rig import FaultHost, FaultPair, pattern

#: how long a case may take to settle after its fault and restarts
SETTLE_S = 25.0
#: how long a migration may take to reach a fault point
POINT_S = 30.0
#: states in which nothing is pending: the daemon is done with the guest for now
STABLE = frozenset({"running", "incoming", "defined", "migrated-away", "failed"})
#: the proxy's cap: a 1 MiB guest with 1 MiB of device state takes about half a second
RATE_BPS = 4 << 20
#: the [migration] keys of every matrix host: switch over after the first pass, and a
#: stalled connection fails in seconds (ack_timeout_s, io_timeout_s), not minutes
MATRIX_MIGRATION = "downtime_limit_ms = 60000\nack_timeout_s = 3\nio_timeout_s = 3\n"


@dataclass
class Verdict:
    states: dict[str, str | None]
    cell: str
    problems: list[str] = field(default_factory=list)

    def check(self, logs: Callable[[], str]) -> None:
        assert not self.problems, (f"{self.cell}; states {self.states}:\n- "
                                   + "\n- ".join(self.problems) + "\n" + logs())


def _active(h: FaultHost, guest: str) -> bool:
    if not h.alive():
        return False
    m = h.migration(guest)
    return m is not None and m["result"] is None


def settle(pair: FaultPair, guest: str) -> dict[str, str | None]:
    """The guest's states once they hold still: stable, the same at two polls in a row
    (a re-open passes through "defined" for a few ms), no migration of it running."""
    seen: list[dict[str, str | None]] = []

    def settled() -> dict[str, str | None] | None:
        states = pair.where(guest)
        quiet = all(s in STABLE for s in states.values()) and not any(
            _active(h, guest) for h in pair.hosts)
        seen.append(states if quiet else {})
        return states if quiet and seen[-2:] == [states, states] else None
    try:
        return dict(wait_until(settled, SETTLE_S, f"{guest} to settle"))
    except AssertionError:
        return pair.where(guest)


def judge(pair: FaultPair, guest: str, migration_id: str | None,
          journaled: Sequence[FaultHost], *, expected: str | None = None) -> Verdict:
    """``journaled``: the hosts whose journals must name the migration (``journals``);
    ``expected``: the RAM digest at the pause (default: the pattern's)."""
    states = settle(pair, guest)
    g = pair.guests[[x.name for x in pair.guests].index(guest)]
    want = expected or hashlib.sha256(pattern(guest, g.ram_bytes)).hexdigest()
    running = [h for h in pair.hosts if states[h.name] == "running"]
    unknown = [h for h in pair.hosts if states[h.name] == "outcome-unknown"]
    problems = []
    if len(running) > 1:
        owner = "two owners"
    elif running:
        owner = f"one owner ({running[0].name})"
    elif len(unknown) == 1:
        owner = f"paused on {unknown[0].name}, outcome unknown"
    else:
        owner = "no owner (" + ", ".join(f"{k} {v}" for k, v in states.items()) + ")"
        problems.append("no host runs it and none holds it paused with its outcome unknown")
    if len(running) > 1:
        problems.append("two hosts run it")
    holder = running[0] if len(running) == 1 else (unknown[0] if unknown else None)
    if holder is not None and holder.ram_digest(guest) != want:
        problems.append(f"the RAM on {holder.name} is not the source's at the pause")
    for h in journaled:
        if migration_id is None or migration_id not in h.journal_text():
            problems.append(f"{h.name}'s journal does not name the migration")
    cell = (f"FAIL: {owner}: " + "; ".join(problems) if problems
            else f"{owner}, nothing lost")
    return Verdict(states, cell, problems)


def case_log(pair: FaultPair, guest: str, migration_id: str) -> str:
    """Both hosts' log lines about this guest or migration, for a failure message."""
    out = []
    for h in pair.hosts:
        lines = [ln for ln in h.log().splitlines() if guest in ln or migration_id in ln
                 or ln.startswith("====") or "Traceback" in ln or "Error" in ln]
        out.append(f"--- {h.name} ---\n" + "\n".join(lines[-60:]))
    return "\n".join(out)


def start_through(pair: FaultPair, guest: str, plan: FaultPlan) -> tuple[FaultProxy, str]:
    """A proxy with ``plan`` in front of the destination, the migration started through it
    and its fault fired at the plan's point; ``PointMissed`` if the migration ended, or
    ``POINT_S`` passed, before the point."""
    proxy = FaultProxy(pair.dst_address, plan, rate_bps=RATE_BPS)
    mid = pair.src.migrate(guest, proxy.address)

    def ended() -> dict[str, Any] | None:
        m = pair.src.migration(guest)
        return m if m is not None and m["result"] is not None else None
    try:
        wait_until(lambda: proxy.fired.is_set() or ended(), POINT_S,
                   f"{guest}'s migration to reach {plan.point}")
        proxy.sync()
        if not proxy.fired.is_set():
            m = ended() or {}
            raise PointMissed(f"the migration ended ({m.get('result')}: {m.get('error')}) "
                              f"before the point; frames seen: {proxy.link.seen}")
    except BaseException:
        proxy.close()
        raise
    return proxy, mid


class PointMissed(AssertionError):
    """The migration never reached the case's fault point."""


def plan_for(fault: Fault, point: Point) -> FaultPlan:
    """The matrix's plan: 16 bytes dropped corrupt a record or a frame without removing
    it."""
    return FaultPlan(fault, point, drop_bytes=16, delay_s=0.2)


def journals(pair: FaultPair, proxy: FaultProxy) -> list[FaultHost]:
    """Whose journal must name the migration: the source's (it ordered it), and the
    destination's once it loaded everything (it acknowledged prepared, or resumed)."""
    loaded = any(s in ("return prepared", "return resumed") for s in proxy.link.seen)
    return [pair.src, pair.dst] if loaded else [pair.src]


def record_case(table: str, row: str, point: Point, verdict: Verdict | None, why: str = "") -> None:
    fault_table.record(table, row, point.value, verdict.cell if verdict else f"FAIL: {why}")
