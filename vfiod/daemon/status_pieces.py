"""``status`` answers spliced from pieces encoded once per change (docs/architecture.md §6;
docs/benchmarks.md §2).

An answer for every guest at 64 guests x 4 devices is about 100 KB of JSON, and encoding
it was half of a request's time. Most of it does not change between two requests: a guest
that is not migrating changes when its lifecycle state, a device's state or opt-out, its
notes or its outcome do. So each guest's piece of the answer is kept, encoded, beside the
copy it was encoded from, and so is the list of finished migrations (one list for an
answer about every guest, one for each guest asked about alone). A request still
copies every guest under the registry lock (the copy is how a change is seen: the
registry's writers change its entries in place, and device states are read from the
drivers at each copy) and compares each copy with the kept one: an equal copy reuses the
kept text, a different one is encoded and kept instead. The answer's text is the pieces
joined, byte for byte what encoding the whole answer at once gives
(``tests/daemon/test_status_pieces.py``).

A guest whose migration runs changes at every request (its progress, the session's live
figures): its piece is encoded each time and not kept.

Equal is Python's ``==``, so a value that changed only between spellings of one number
(``1`` and ``1.0``, ``True`` and ``1``) keeps its earlier spelling until the guest changes
otherwise; the registry's fields each hold one type, so this does not arise there.

Requests may build at the same time: each kept pair (copy, text) is replaced whole, so a
request compares its copy with a pair that belongs together, whichever request left it.
The answer's dicts are shared with the pieces kept here: like every ``EncodedResult``,
they must not be changed after.
"""

from __future__ import annotations

from typing import Any

from vfiod.api.schema import EncodedResult, compact_json

Row = dict[str, Any]


def _changes_each_time(guest: Row) -> bool:
    m = guest["migration"]
    return m is not None and (m["result"] is None or "live" in m)


class StatusPieces:
    def __init__(self) -> None:
        self._guests: dict[str, tuple[Row, bytes]] = {}
        self._finished: dict[str | None, tuple[list[Row], bytes]] = {}
        #: pieces encoded rather than reused (for tests and the README)
        self.encoded = 0

    def answer(self, daemon: Row, guests: list[Row], finished: list[Row],
               observed: list[Row], only: str | None = None) -> EncodedResult:
        """The ``status`` result ``{"daemon", "guests", "finished", "observed"}`` with its
        text; ``guests`` and ``finished`` as ``Registry.status_rows(only)`` copied them."""
        text = b'{"daemon":%s,"guests":[%s],"finished":%s,"observed":%s}' % (
            compact_json(daemon), b",".join(map(self._guest, guests)),
            self._finished_text(finished, only), compact_json(observed))
        return EncodedResult({"daemon": daemon, "guests": guests, "finished": finished,
                              "observed": observed}, text)

    def _guest(self, row: Row) -> bytes:
        kept = self._guests.get(row["name"])
        if kept is not None and kept[0] == row:
            return kept[1]
        text = compact_json(row)
        self.encoded += 1
        if _changes_each_time(row):
            self._guests.pop(row["name"], None)
        else:
            self._guests[row["name"]] = (row, text)
        return text

    def _finished_text(self, rows: list[Row], only: str | None) -> bytes:
        kept = self._finished.get(only)
        if kept is not None and kept[0] == rows:
            return kept[1]
        text = compact_json(rows)
        self.encoded += 1
        self._finished[only] = (rows, text)
        return text
