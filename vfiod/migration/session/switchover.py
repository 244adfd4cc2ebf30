"""The confirmed switchover's durable records, as a session needs them
(docs/architecture.md §1.7, §1.8; docs/protocol.md §8.4).

A session calls its ``SwitchoverJournal`` at the points where a promise to the peer is
made; the daemon's implementation writes the journal and returns only once the record is
on disk. An in-process migration (the demo, tests of one session pair) has nothing that
outlives the process and uses ``UNJOURNALED``.
"""

from __future__ import annotations

from typing import Protocol


class SwitchoverJournal(Protocol):
    """The records the confirmed switchover needs on disk before its next step
    (docs/architecture.md §1.7, §1.8): each call returns only once its record is durable,
    and raises (the step must not happen) when it cannot be written."""

    def committing(self, migration_id: str) -> None:
        """Source: the decision to commit, before COMMIT is sent."""

    def prepared(self, migration_id: str) -> None:
        """Destination: loaded and verified, before PREPARED is answered."""

    def resuming(self, migration_id: str) -> None:
        """Destination: COMMIT received, before the devices resume."""

    def discarding(self, migration_id: str) -> None:
        """Destination, once prepared: before it tells the source that it discarded (the
        source resumes the guest on that word)."""

    def switchover_write_s(self) -> float:
        """What one confirmed switchover's durable records cost, both ends together (the
        source's commit, the destination's prepared and resume), at the time this host's
        journal takes per record; the peer's disk is assumed alike. It is inside the
        downtime: the prediction's ``journal`` part (docs/architecture.md §4)."""


class _Unjournaled:
    """An in-process migration (the demo, tests of one session pair): nothing outlives
    the process, so there is nothing to write down."""

    def committing(self, migration_id: str) -> None:
        pass

    def prepared(self, migration_id: str) -> None:
        pass

    def resuming(self, migration_id: str) -> None:
        pass

    def discarding(self, migration_id: str) -> None:
        pass

    def switchover_write_s(self) -> float:
        return 0.0


UNJOURNALED: SwitchoverJournal = _Unjournaled()
