"""Calling the control socket as an unprivileged user: a forked child drops to
uid/gid 65534 (no groups) and reports what it saw through a pipe, so a test can check
that SO_PEERCRED refuses it (docs/architecture.md §6 "Control socket")."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from vfiod.api import ControlClient
from vfiod.api.client import ClientError

NOBODY = 65534


def in_forked_child(body: Callable[[], Any]) -> dict[str, Any]:
    """Run ``body()`` in a forked child and return what it returned (JSON-able, through
    a pipe); an exception there comes back as ``{"child": repr}``. For what must not
    happen in the test process (dropping privileges, unsharing mounts)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                          # child: report through the pipe, then _exit
        try:
            os.close(r)
            out: Any = body()
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            out = {"child": repr(e)}
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return dict(json.loads(data))


def call_as_nobody(path: str, call: Callable[[ControlClient], Any]) -> dict[str, Any]:
    """``call`` a client on ``path`` as nobody; ``{"result": ...}``, or the ClientError's
    ``kind``/``code``/``message``, or ``{"child": ...}`` for anything else."""
    def as_nobody() -> dict[str, Any]:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        try:
            with ControlClient(path, timeout=20) as c:
                return {"result": call(c)}
        except ClientError as e:
            return {"kind": e.kind, "code": e.code.value if e.code else None,
                    "message": e.message}
    return in_forked_child(as_nobody)
