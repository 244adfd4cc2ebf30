"""The bandwidth prior's lookup as a child process (docs/architecture.md §4).

``python -m vfiod.migration.planning.linkprior_probe DESTINATION`` runs ``link_prior``
and prints its answer as one line of JSON (``prior_to_json``), exit status 0; a wrong
command line exits 2 with the usage on stderr. ``daemon/link_prior_lookup.py`` starts it once per
outgoing migration so that pyroute2 and the ``asyncio`` it imports are loaded here, in a
process that exits after two queries, and never in the daemon (docs/benchmarks.md §2).
"""

from __future__ import annotations

import sys

from vfiod.migration.planning.linkprior import link_prior, prior_to_json

USAGE = "usage: python -m vfiod.migration.planning.linkprior_probe DESTINATION"


def main(argv: list[str]) -> int:
    """``argv``: the arguments after the module's name; returns the exit status."""
    if len(argv) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    print(prior_to_json(link_prior(argv[0])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
