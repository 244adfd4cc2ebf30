"""The per-device pre-copy dirty-tracking opt-out, with QEMU's semantics (docs/architecture.md §3;
QEMU's ``x-pre-copy-dirty-page-tracking=off``).

A device configured with ``pre_copy_dirty_page_tracking = False`` stops its container's
bitmap from being *queried* while ANY such device of that container is RUNNING or
PRE_COPY. Tracking itself keeps running, so the bits accumulate in the kernel; the first
sync after those devices leave RUNNING/PRE_COPY (stop-and-copy: STOP_COPY or STOP)
collects everything written meanwhile. Until then the tracker counts the container's
whole mapped range as dirty, so neither the RAM sender nor the predictor treats it as
clean.

Device states come from the migration layer, which the dirty layer must not import: the
tracker is given a callable ``name -> MigState`` or a mapping. A device whose state is
unknown counts as RUNNING (the cautious answer: skip the query, count all as dirty).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from vfiod.abi.vfio import MigState

#: what the tracker is told about device migration states
StateSource = Callable[[str], "MigState | int | None"] | Mapping[str, "MigState | int"]

#: states in which an opted-out device blocks its container's query (QEMU: RUNNING or
#: PRE_COPY; the P2P states are already quiescing, so the query goes ahead there)
BLOCKING_STATES = frozenset({MigState.RUNNING, MigState.PRE_COPY})


def state_lookup(source: StateSource | None) -> Callable[[str], MigState | None]:
    """A ``name -> MigState | None`` function over a callable, a mapping or nothing."""
    if source is None:
        return lambda _name: None
    if isinstance(source, Mapping):
        table = source
        return lambda name: _as_state(table.get(name))
    fn = source
    return lambda name: _as_state(fn(name))


def _as_state(value: MigState | int | None) -> MigState | None:
    if value is None:
        return None
    try:
        return MigState(int(value))
    except ValueError:
        return None


@dataclass(frozen=True)
class OptOut:
    """The opted-out devices of one container."""

    devices: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, names: Iterable[str],
                    pre_copy_tracking: Mapping[str, bool]) -> OptOut:
        """``pre_copy_tracking[name]`` False opts a device out (missing = default on)."""
        return cls(tuple(n for n in names if pre_copy_tracking.get(n, True) is False))

    def blocking(self, lookup: Callable[[str], MigState | None]) -> list[str]:
        """Opted-out devices that currently forbid querying, each as ``name (STATE)``."""
        out = []
        for name in self.devices:
            st = lookup(name)
            if st is None or st in BLOCKING_STATES:
                out.append(f"{name} ({st.name if st is not None else 'state unknown'})")
        return out
