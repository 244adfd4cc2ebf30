"""Migration drivers wrapped to record the hooks called on them (docs/architecture.md §1.4-§1.6
hook order): ``Traced`` appends each hook's name to a list; ``HookLog`` (the real-kernel
tier) also reads the device state back from the kernel after each hook, and can cut the
stop-and-copy data short (a fault a destination kernel must refuse).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from vfiod.errors import KernelError
from vfiod.migration.device.protocol import MigrationDriver
from vfiod.migration.guest import GuestDevice
from vfiod.migration.states import MigState

#: the driver methods a session calls as hooks (``MigrationDriver``)
HOOKS = frozenset({"save_setup", "save_live_pending", "save_live_iterate", "quiesce_p2p",
                   "save_live_complete_precopy", "save_state", "check_state", "load_setup",
                   "load_state", "load_complete", "resume", "cleanup", "rollback"})


class Traced:
    """A driver whose hook calls are appended to ``hooks`` (in call order)."""

    def __init__(self, drv: MigrationDriver, hooks: list[str]) -> None:
        self._drv = drv
        self._hooks = hooks

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._drv, name)
        if name not in HOOKS:
            return attr

        @functools.wraps(attr)            # the session names a hook by its method's name
        def call(*args: object, **kw: object) -> object:
            self._hooks.append(name)
            return attr(*args, **kw)
        return call


class HookLog:
    """Stands in for a device's migration driver: passes every call through and, after
    each hook, reads the device state back from the kernel (GET MIG_DEVICE_STATE)."""

    def __init__(self, gd: GuestDevice) -> None:
        self._driver = gd.driver
        self._device = gd.device
        self.calls: list[tuple[str, MigState | None]] = [("opened", self._kernel_state())]
        #: fault injection: forward only this many bytes of the stop-copy data
        self.stopcopy_keep: int | None = None

    def _kernel_state(self) -> MigState | None:
        if self._device.closed:                 # released by the session
            return None
        try:
            st = self._device.get_mig_state()
        except KernelError:                     # never hide the hook's own outcome
            return None
        return st if isinstance(st, MigState) else None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._driver, name)
        if name not in HOOKS:
            return attr

        @functools.wraps(attr)            # the session names a hook by its method's name
        def logged(*args: Any) -> Any:
            if name == "save_live_complete_precopy" and self.stopcopy_keep is not None:
                args = (self._cut(args[0]),)
            try:
                return attr(*args)
            finally:
                self.calls.append((name, self._kernel_state()))
        return logged

    def _cut(self, sink: Callable[[bytes | memoryview], None]
             ) -> Callable[[bytes | memoryview], None]:
        """A sink that passes on the first ``stopcopy_keep`` bytes and drops the rest:
        the stream stays well-formed (its checksums are computed after), the device
        state in it is short."""
        left = [self.stopcopy_keep or 0]

        def cut(chunk: bytes | memoryview) -> None:
            part = chunk[:left[0]]
            left[0] -= len(part)
            if len(part):
                sink(part)
        return cut

    def states(self) -> list[MigState]:
        """The kernel states seen, consecutive repeats folded."""
        out: list[MigState] = []
        for _, st in self.calls:
            if st is not None and (not out or out[-1] is not st):
                out.append(st)
        return out

    def hooks(self) -> list[str]:
        out: list[str] = []
        for name, _ in self.calls[1:]:
            if not out or out[-1] != name:
                out.append(name)
        return out
