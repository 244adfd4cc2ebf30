"""The threads the control socket runs requests on (docs/architecture.md §6).

The control loop (``control_server.py``) reads every connection itself and hands each
complete request to ``RequestWorkers.submit``. A worker that finished a request waits
(parked) for the next one for up to ``PARK_S`` seconds, then exits: a steady stream of
requests reuses the same few threads instead of starting one per connection, and an idle
daemon keeps none. At most one request per connection is in flight, so there are never
more workers than admitted connections.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("vfiod.control")

#: How long a worker waits for its next request before it exits.
PARK_S = 30.0

Job = Callable[[], None]


class _Worker:
    """One worker's mailbox: a job handed to it while it is parked."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()


class RequestWorkers:
    def __init__(self, name: str, park_s: float = PARK_S) -> None:
        self.name = name
        self.park_s = park_s
        self._lock = threading.Lock()
        #: the most recently parked last (it is handed the next job, so the others age out)
        self._parked: list[_Worker] = []
        self.started = 0                    # threads started so far

    def submit(self, job: Job) -> None:
        """Run ``job`` on a parked worker, or on a new one; never blocks."""
        with self._lock:
            worker = self._parked.pop() if self._parked else None
        if worker is not None:
            worker.jobs.put(job)
            return
        self.started += 1
        threading.Thread(target=self._run, args=(_Worker(), job), name=self.name,
                         daemon=True).start()

    def parked(self) -> int:
        with self._lock:
            return len(self._parked)

    def _run(self, me: _Worker, job: Job) -> None:
        while True:
            try:
                job()
            except Exception:  # noqa: BLE001 - a job's bug must not lose the worker
                log.exception("%s: request job failed", self.name)
            with self._lock:
                self._parked.append(me)
            try:
                job = me.jobs.get(timeout=self.park_s)
            except queue.Empty:
                with self._lock:
                    if me in self._parked:      # nobody picked it: leave
                        self._parked.remove(me)
                        return
                # ``submit`` took it off the list as the wait ended: its job is coming
                job = me.jobs.get()
