"""The exit codes of every ``vfiod`` command, in one table, and how an error is reported
(docs/protocol.md: the control protocol's error codes).

``EXIT_TABLE`` is the only list of exit codes: ``vfiod --help`` and ``vfiod ctl --help``
print it (``table_text``) and the README carries the same lines (a test compares them).
``API_EXIT`` maps every ``ApiErrorCode`` the daemon can answer with to one of them, so a
request the daemon refuses as malformed is a usage error (2), never "failed" (1).

An error is one line on stderr for people, or, with ``--json``, one JSON object on stdout
for scripts: ``{"code": ..., "message": ..., "details": {...}}``. ``code`` is the
daemon's ``ApiErrorCode`` when the daemon answered, else the table's name for the exit
status (``usage``, ``unreachable``, ``permission_denied``, ...); ``details`` holds the
command and the exit status.
"""

from __future__ import annotations

import enum
import json
import sys
import textwrap
from typing import Any

from vfiod.api import ApiErrorCode


class Exit(enum.IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNREACHABLE = 3
    PERMISSION_DENIED = 4
    NOT_FOUND = 5
    BUSY = 6
    INTERRUPTED = 130          # 128 + SIGINT, as a shell reports a Ctrl-C'd program
    PIPE_CLOSED = 141          # 128 + SIGPIPE, as a shell reports a writer whose reader left


#: (exit status, what it means): printed by --help, mirrored in the README.
EXIT_TABLE: tuple[tuple[Exit, str], ...] = (
    (Exit.OK, "success (check: it can migrate; migrate/watch: the migration completed)"),
    (Exit.FAILED, "the operation failed (check: it cannot migrate; migrate: failed or "
                  "cancelled; devices: discovery failed; kernels: a kernel did not "
                  "compile; run: could not start)"),
    (Exit.USAGE, "bad usage: a wrong argument or option, found by vfiod or by the daemon"),
    (Exit.UNREACHABLE, "no daemon at the socket (not running? wrong --socket?)"),
    (Exit.PERMISSION_DENIED, "permission denied: run as root or as a member of the vfiod "
                             "group"),
    (Exit.NOT_FOUND, "no such guest or device (or no migration to cancel)"),
    (Exit.BUSY, "busy: the guest is migrating already"),
    (Exit.INTERRUPTED, "interrupted (Ctrl-C)"),
    (Exit.PIPE_CLOSED, "the reader of the output went away (e.g. vfiod ctl status piped "
                       "into head)"),
)

#: What each daemon error code means for the exit status.
API_EXIT: dict[ApiErrorCode, Exit] = {
    ApiErrorCode.BAD_JSON: Exit.USAGE,
    ApiErrorCode.BAD_REQUEST: Exit.USAGE,
    ApiErrorCode.UNKNOWN_OP: Exit.USAGE,
    ApiErrorCode.TOO_LARGE: Exit.USAGE,
    ApiErrorCode.UNSUPPORTED_SCHEMA: Exit.FAILED,      # client and daemon versions differ
    ApiErrorCode.PERMISSION_DENIED: Exit.PERMISSION_DENIED,
    ApiErrorCode.NOT_FOUND: Exit.NOT_FOUND,
    ApiErrorCode.BUSY: Exit.BUSY,
    ApiErrorCode.FAILED: Exit.FAILED,
    ApiErrorCode.INTERNAL: Exit.FAILED,
    # the daemon closed an idle connection (docs: README "Limits"): ctl never idles
    # between request and answer, so this is a daemon under a connection flood
    ApiErrorCode.TIMEOUT: Exit.BUSY,
}


def table_text(indent: str = "  ") -> str:
    """The table as --help prints it, each meaning wrapped under itself."""
    lead = f"{indent}{'':<3} "
    return "".join(textwrap.fill(text, 88, initial_indent=f"{indent}{code.value:<3} ",
                                 subsequent_indent=lead) + "\n"
                   for code, text in EXIT_TABLE)


def code_name(status: Exit) -> str:
    return status.name.lower()


def report_error(command: str, status: Exit, message: str, *, as_json: bool,
                 code: str | None = None, details: dict[str, Any] | None = None) -> int:
    """Print one error the way the caller asked for and return ``status``."""
    if as_json:
        body = {"code": code or code_name(status), "message": message,
                "details": {"command": command, "exit_status": int(status), **(details or {})}}
        sys.stdout.write(json.dumps(body, sort_keys=True) + "\n")
        sys.stdout.flush()
    else:
        print(f"{command}: {message}", file=sys.stderr)
    return int(status)
