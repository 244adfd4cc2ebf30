"""The v2 state machine of the simulated kernel against the documented protocol
(docs/kernel-contract.md §6.3 - §6.6): every (from, to) pair of the 8 states, for every v2
capability set, checked against an expectation derived here -- independently of the
simulator's next-hop table -- from the list of arcs drivers implement (§6.5):

* reachable target -> success, final state = target, the path taken is one of the
  shortest paths over implemented arcs on which a session-opening arc can only be last;
  data_fd >= 0 exactly when that last arc opens a session;
* ERROR as source, ERROR / unsupported / >= 8 as target -> EINVAL, the payload copied
  back with the requested state and data_fd -1, the device unchanged;
* STOP_COPY -> PRE_COPY / PRE_COPY_P2P on a PRE_COPY device -> SimulatorViolation.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

import vfiod.abi.vfio as v
from tests.support.sim_mig_rig import MIG_STATE, Dev, MigRig, S, specs
from vfiod.errors import KernelError, SimulatorViolation
from vfiod.kernel.sim.migration.v2 import MigrationV2

SC, P2P, PRE = v.VFIO_MIGRATION_STOP_COPY, v.VFIO_MIGRATION_P2P, v.VFIO_MIGRATION_PRE_COPY
V2_SETS = [f"{b}{log}" for b in ("v2_stop_copy", "v2_p2p", "v2_precopy", "v2_precopy_p2p")
           for log in ("", "_log")]

# -- the documented protocol (§6.2, §6.5), written out independently -----------------------
NEEDS = {S.STOP: SC, S.RUNNING: SC, S.STOP_COPY: SC, S.RESUMING: SC,
         S.RUNNING_P2P: SC | P2P, S.PRE_COPY: SC | PRE, S.PRE_COPY_P2P: SC | P2P | PRE}
OPENS_SAVE = {(S.RUNNING, S.PRE_COPY), (S.RUNNING_P2P, S.PRE_COPY_P2P), (S.STOP, S.STOP_COPY)}
OPENS_RESUME = {(S.STOP, S.RESUMING)}


def arcs(flags: int) -> set[tuple[S, S]]:
    a = {(S.STOP, S.STOP_COPY), (S.STOP_COPY, S.STOP), (S.STOP, S.RESUMING),
         (S.RESUMING, S.STOP)}
    if flags & P2P:
        a |= {(S.RUNNING, S.RUNNING_P2P), (S.RUNNING_P2P, S.RUNNING),
              (S.RUNNING_P2P, S.STOP), (S.STOP, S.RUNNING_P2P)}
    else:
        a |= {(S.RUNNING, S.STOP), (S.STOP, S.RUNNING)}
    if flags & PRE and not flags & P2P:
        a |= {(S.RUNNING, S.PRE_COPY), (S.PRE_COPY, S.RUNNING), (S.PRE_COPY, S.STOP_COPY)}
    if flags & PRE and flags & P2P:
        a |= {(S.RUNNING, S.PRE_COPY), (S.PRE_COPY, S.RUNNING),
              (S.PRE_COPY, S.PRE_COPY_P2P), (S.PRE_COPY_P2P, S.PRE_COPY),
              (S.PRE_COPY_P2P, S.RUNNING_P2P), (S.PRE_COPY_P2P, S.STOP_COPY),
              (S.RUNNING_P2P, S.PRE_COPY_P2P)}
    return a


def shortest_paths(flags: int, src: S, dst: S, *, opening_last_only: bool) -> list[list[S]]:
    """Every shortest path (list of states) from src to dst over the implemented arcs."""
    graph = arcs(flags)
    opening = OPENS_SAVE | OPENS_RESUME
    best: list[list[S]] = []
    queue: deque[list[S]] = deque([[src]])
    while queue:
        path = queue.popleft()
        if best and len(path) > len(best[0]):
            break
        if path[-1] == dst:
            best.append(path)
            continue
        for a, b in sorted(graph):
            if a != path[-1] or b in path:
                continue
            if opening_last_only and (a, b) in opening and b != dst:
                continue
            queue.append(path + [b])
    return best


# Multi-hop paths the reference spells out for a device with every feature (§6.6).
DOCUMENTED = {
    (S.RUNNING, S.STOP): [S.RUNNING, S.RUNNING_P2P, S.STOP],
    (S.RUNNING, S.STOP_COPY): [S.RUNNING, S.RUNNING_P2P, S.STOP, S.STOP_COPY],
    (S.RUNNING, S.RESUMING): [S.RUNNING, S.RUNNING_P2P, S.STOP, S.RESUMING],
    (S.PRE_COPY, S.STOP_COPY): [S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY],
    (S.RESUMING, S.RUNNING): [S.RESUMING, S.STOP, S.RUNNING_P2P, S.RUNNING],
    (S.STOP_COPY, S.RUNNING): [S.STOP_COPY, S.STOP, S.RUNNING_P2P, S.RUNNING],
    (S.PRE_COPY, S.RESUMING): [S.PRE_COPY, S.RUNNING, S.RUNNING_P2P, S.STOP, S.RESUMING],
    (S.STOP, S.PRE_COPY): [S.STOP, S.RUNNING_P2P, S.RUNNING, S.PRE_COPY],
}


# -- rig: one host per capability set, reused by all its pairs -----------------------------
@pytest.fixture(scope="module")
def rigs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, MigRig]]:
    made: dict[str, MigRig] = {}
    yield made
    for r in made.values():
        r.close()


def device(rigs: dict[str, MigRig], tmp: Path, capset: str) -> Dev:
    if capset not in rigs:
        spec = specs()[capset]
        rigs[capset] = MigRig(tmp / capset, [spec])
    r = rigs[capset]
    d = next(iter(r.devs.values()))
    d.rig.faults.clear()
    d.reset()
    assert d.get_state() == S.RUNNING
    return d


def handler(d: Dev) -> MigrationV2:
    h = d.parts.features[0]
    assert isinstance(h, MigrationV2)
    return h


def put_in(d: Dev, flags: int, state: S) -> list[int]:
    """Drive the device from RUNNING into ``state`` one documented arc at a time
    (ERROR: fail an arc with an injected EIO). Returns the data fds opened on the way."""
    fds: list[int] = []
    if state == S.ERROR:
        first = S.RUNNING_P2P if flags & P2P else S.STOP
        d.rig.faults.inject(f"transition:RUNNING->{first.name}", errno.EIO)
        with pytest.raises(KernelError) as e:
            d.set_state(first)
        assert e.value.errno == errno.EIO
        d.rig.faults.clear()
    elif state == S.RESUMING:
        # RESUMING -> STOP validates the stream, so load a valid one: this device's own.
        put_in(d, flags, S.STOP)
        save_fd = d.set_state(S.STOP_COPY)
        stream = d.drain(save_fd)
        d.set_state(S.STOP)
        d.kernel.close(save_fd)
        fds.append(d.set_state(S.RESUMING))
        assert d.kernel.write(fds[0], stream) == len(stream)
    else:
        (path,) = shortest_paths(flags, S.RUNNING, state, opening_last_only=False)[:1]
        for nxt in path[1:]:
            fd = d.set_state(nxt)
            if fd >= 0:
                fds.append(fd)
    assert d.get_state() == state
    return fds


@pytest.mark.parametrize("capset", V2_SETS)
@pytest.mark.parametrize("cur", list(S), ids=lambda s: s.name)
@pytest.mark.parametrize("target", list(S), ids=lambda s: s.name)
def test_every_pair(rigs: dict[str, MigRig], tmp_path_factory: pytest.TempPathFactory,
                    capset: str, cur: S, target: S) -> None:
    d = device(rigs, tmp_path_factory.getbasetemp(), capset)
    flags = d.spec.mig_flags
    assert d.mig_flags() == flags
    if cur != S.ERROR and flags & NEEDS[cur] != NEEDS[cur]:
        # The source state does not exist on this device: it cannot even be set up.
        _, err = d.set_state_raw(cur)
        assert err is not None and err.errno == errno.EINVAL
        assert d.get_state() == S.RUNNING
        return
    fds = put_in(d, flags, cur)
    handler(d).arcs.clear()
    try:
        check_request(d, flags, cur, target)
    finally:
        for fd in fds:
            d.kernel.close(fd)


def check_request(d: Dev, flags: int, cur: S, target: S) -> None:
    supported = target != S.ERROR and flags & NEEDS[target] == NEEDS[target]
    if cur == S.STOP_COPY and target in (S.PRE_COPY, S.PRE_COPY_P2P) and supported:
        with pytest.raises(SimulatorViolation, match="STOP_COPY -> PRE_COPY"):
            d.set_state_raw(target)
        return
    if cur == S.ERROR or not supported:
        buf, err = d.set_state_raw(target)
        assert err is not None and err.errno == errno.EINVAL, err
        assert MIG_STATE.unpack_from(buf, 8) == (target, -1)     # copied back (§6.3)
        assert d.get_state() == cur
        assert list(handler(d).arcs) == []
        return
    buf, err = d.set_state_raw(target)
    assert err is None, err
    state, fd = MIG_STATE.unpack_from(buf, 8)
    assert state == target and d.get_state() == target
    taken = [cur] + [b for _, b in handler(d).arcs]
    if cur == target:
        assert taken == [cur] and fd == -1
        return
    allowed = shortest_paths(flags, cur, target, opening_last_only=True)
    assert taken in allowed, f"{taken} not among {allowed}"
    if flags == SC | P2P | PRE and (cur, target) in DOCUMENTED:
        assert taken == DOCUMENTED[(cur, target)]
    last = (taken[-2], taken[-1])
    if last in OPENS_SAVE | OPENS_RESUME:
        assert fd >= 0
        f = d.kernel.file_of(fd)
        assert f is not None and f.kind == "mig_data"
        d.kernel.close(fd)
    else:
        assert fd == -1


@pytest.mark.parametrize("value", [8, 9, 0x7FFFFFFF, 0xFFFFFFFF])
def test_out_of_range_states_are_einval(rigs: dict[str, MigRig],
                                        tmp_path_factory: pytest.TempPathFactory,
                                        value: int) -> None:
    d = device(rigs, tmp_path_factory.getbasetemp(), "v2_precopy_p2p")
    buf, err = d.set_state_raw(value)
    assert err is not None and err.errno == errno.EINVAL
    assert MIG_STATE.unpack_from(buf, 8)[1] == -1
    assert d.get_state() == S.RUNNING


def test_error_state_answers_configured_errno(tmp_path: Path) -> None:
    """pds short-circuits a SET in ERROR with EIO (docs/kernel-contract.md §8)."""
    import dataclasses
    spec = specs()["v2_p2p"]
    spec = dataclasses.replace(spec, extra={"error_set_errno": errno.EIO})
    r = MigRig(tmp_path, [spec])
    try:
        d = r[spec.name]
        put_in(d, spec.mig_flags, S.ERROR)
        _, err = d.set_state_raw(S.RUNNING)
        assert err is not None and err.errno == errno.EIO
        d.reset()
        assert d.get_state() == S.RUNNING
    finally:
        r.close()


def test_expectation_helper_can_tell_paths_apart() -> None:
    # The oracle itself: without the "opening arc last" rule RUNNING -> STOP_COPY could go
    # through PRE_COPY; with it, only the quiescing path remains.
    all_flags = SC | P2P | PRE
    loose = shortest_paths(all_flags, S.RUNNING, S.STOP_COPY, opening_last_only=False)
    strict = shortest_paths(all_flags, S.RUNNING, S.STOP_COPY, opening_last_only=True)
    assert [S.RUNNING, S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY] in loose
    assert strict == [[S.RUNNING, S.RUNNING_P2P, S.STOP, S.STOP_COPY]]
