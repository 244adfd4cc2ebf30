"""Run-state backends: how vfiod asks a VMM to pause and resume a guest's vCPUs, with
acknowledgements and deadlines (docs/architecture.md §8.2; the line protocol for VMMs
without QMP: docs/runstate-protocol.md)."""

from vfiod.daemon.runstate.contract import RunStateBackend, RunStateError, RunStatus
from vfiod.daemon.runstate.lines import LineRunState
from vfiod.daemon.runstate.qmp import QmpRunState

__all__ = ["LineRunState", "QmpRunState", "RunStateBackend", "RunStateError", "RunStatus"]
