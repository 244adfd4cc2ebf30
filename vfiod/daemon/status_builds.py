"""``status`` answers built once for every request that arrives while one is being built
(docs/architecture.md §6; README "Load").

A full answer (16 guests x 4 devices: about 24 KB of JSON) costs a copy of the registry
under its lock and an encoding. When requests queue up (a migration holding the registry
lock, a burst of clients), building one answer per request makes the queue drain slowly
exactly when it is longest. Instead, a request that arrives while another request's
build has not yet let go of the registry lock waits for that build and shares its
answer, encoded once (each answer's text spliced from pieces kept since earlier
requests, ``status_pieces.py``).

Sharing never shows a request an older state than it could see alone: the build copies
the registry in one hold of its lock, so every write that had ended when a joining
request arrived (before the build let go of the lock) ended before that hold began, and
the copy has it. A request that arrives after the hold ended starts a new build. With
one client at a time nothing is shared and each request builds its own answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from vfiod.api.schema import EncodedResult


class _Build:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: EncodedResult | None = None
        self.error: BaseException | None = None


class StatusBuilds:
    """``get()`` returns a full status answer: a new one, or one a concurrent request is
    building. ``build(copied)`` makes the answer (an ``EncodedResult``, or a plain dict
    encoded here) and must call ``copied()`` while it still holds the registry lock, right
    after its copy."""

    def __init__(self, build: Callable[[Callable[[], None]], dict[str, Any]]) -> None:
        self._build = build
        self._mutex = threading.Lock()
        self._open: _Build | None = None       # the build new requests may still join
        #: requests answered by a build another request started (for tests and the README)
        self.shared = 0

    def get(self) -> EncodedResult:
        with self._mutex:
            b = self._open
            mine = b is None
            if b is None:
                b = self._open = _Build()
            else:
                self.shared += 1
        if mine:
            self._run(b)
        b.done.wait()
        if b.error is not None:
            raise b.error
        assert b.result is not None
        return b.result

    def _run(self, b: _Build) -> None:
        def copied() -> None:
            with self._mutex:
                if self._open is b:
                    self._open = None
        try:
            result = self._build(copied)
            b.result = result if isinstance(result, EncodedResult) else EncodedResult(result)
        except BaseException as e:  # every joiner gets the builder's error, then it goes on
            b.error = e
            raise
        finally:
            copied()
            b.done.set()
