"""The ways a migration driver refuses or fails (docs/architecture.md §1.6, §2 "Errors"; docs/kernel-contract.md
§6.3, §6.6, §11): a hook out of order, a transition that must never reach the kernel, a
destination that cannot take the source's state, and a state change that failed after the
recovery ladder ran.

Each names the device; ``DeviceTransitionError`` also keeps the first errno and every rung
of the ladder, so callers branch on errno and operators read what was tried.
"""

from __future__ import annotations

from collections.abc import Iterable

from vfiod.errors import KernelError, VfiodError
from vfiod.migration.device.protocol import HookPhase
from vfiod.migration.states import MigState

__all__ = ["HookOrderError", "ForbiddenTransition", "DeviceMismatch",
           "DeviceTransitionError"]


class HookOrderError(VfiodError, RuntimeError):
    """A hook was called in a phase where it makes no sense (a session bug)."""

    def __init__(self, device: str, hook: str, phase: HookPhase,
                 expected: Iterable[HookPhase]) -> None:
        self.device, self.hook, self.phase = device, hook, phase
        exp = ", ".join(p.name for p in expected)
        super().__init__(f"{hook} on {device}: called in phase {phase.name}; allowed in {exp}")


class ForbiddenTransition(VfiodError, RuntimeError):
    """A driver was asked for a transition that must never reach the kernel
    (STOP_COPY -> PRE_COPY/PRE_COPY_P2P hangs kernels 6.2+): a caller bug."""


class DeviceMismatch(VfiodError):
    """The destination device cannot take the source device's state; lists every reason."""

    def __init__(self, device: str, reasons: list[str]) -> None:
        self.device = device
        self.reasons = list(reasons)
        super().__init__(f"{device}: cannot load the source device's state: "
                         + "; ".join(self.reasons))


class DeviceTransitionError(KernelError):
    """A device state change failed; says what happened at each rung of the recovery
    ladder (target, read back, recovery state, reset) and keeps the first errno.

    ``final`` is the state the device was left in (None if it could not be read back),
    ``reset`` whether VFIO_DEVICE_RESET was used."""

    def __init__(self, err: int, op: str, target: str, rungs: list[str],
                 final: MigState | None, reset: bool) -> None:
        super().__init__(err, op, target, "; ".join(rungs))
        self.rungs = list(rungs)
        self.final = final
        self.reset = reset

    def __reduce__(self) -> tuple[object, ...]:
        return (DeviceTransitionError,
                (self.errno, self.op, self.target, self.rungs, self.final, self.reset))
