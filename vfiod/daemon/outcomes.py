"""Outcome queries between daemons: one side of a migration asks the other what became of
it, and the other answers from its journal (docs/protocol.md §8.4; docs/architecture.md
§1.7).

    asker → peer   offer frame, kind "query": guest, migration id, the asker's role, and
                   decision "commit" when a source that journaled its commit asks
    peer → asker   ACK stage "outcome" {"outcome": ..., "state": ...}, then close
                   (or ERROR code "offer" with the reason)

``ask_outcome`` is the asker's half; ``OutcomeAnswer`` is what either side deals in.
"""

from __future__ import annotations

from dataclasses import dataclass

from vfiod.daemon.offer import Offer
from vfiod.errors import ProtocolError
from vfiod.migration.transport import TlsConfig, connect
from vfiod.migration.transport.control import AckStage, ControlMessage
from vfiod.migration.transport.tcp import Connection

#: Every answer (docs/protocol.md §8.4). The first group settles a migration, the second
#: means "ask again later".
SETTLING = ("committed", "rolled-back", "resumed", "discarded", "lost", "unknown")
WAITING = ("prepared", "in-progress")
ANSWERS = SETTLING + WAITING


@dataclass(frozen=True)
class OutcomeAnswer:
    outcome: str
    state: str = ""             # the answering side's lifecycle state of the guest

    def __post_init__(self) -> None:
        if self.outcome not in ANSWERS:
            raise ProtocolError(f"outcome answer {self.outcome!r} is not one of "
                                f"{', '.join(ANSWERS)}")

    @property
    def settles(self) -> bool:
        return self.outcome in SETTLING


def ask_outcome(host: str, port: int, query: Offer, *, tls: TlsConfig | None,
                timeout_s: float) -> OutcomeAnswer:
    """Ask the daemon at ``host:port``; ``TransportError`` when it cannot be reached or
    refuses, ``ProtocolError`` when its answer is not one."""
    if query.kind != "query":
        raise ValueError(f"an outcome query must be of kind 'query', not {query.kind!r}")
    with connect(host, port, tls=tls, timeout=timeout_s) as conn:
        conn.send_buffers([query.encode()])
        ack = conn.wait_ack(AckStage.OUTCOME, timeout_s)
    return OutcomeAnswer(str(ack.fields.get("outcome", "")), str(ack.fields.get("state", "")))


def send_answer(conn: Connection, answer: OutcomeAnswer) -> None:
    conn.send_control(ControlMessage.ack(AckStage.OUTCOME, outcome=answer.outcome,
                                         state=answer.state))
