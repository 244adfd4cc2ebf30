"""A source daemon asks for the bandwidth prior in a child process and never imports
pyroute2 (``daemon/link_prior_lookup.py``; docs/benchmarks.md §2: pyroute2 and the
``asyncio`` it imports held 10.6 MiB of a source daemon for two queries per migration).

Two in-process daemons (tests/support/sim_vmm.py) migrate a guest, in a process of their
own so that nothing else of the test run has imported pyroute2; that process then says
which modules it holds and what the lookup logged. Migrations to one destination share
one lookup (``daemon/link_priors.py``): a child costs 0.3 CPU-seconds, and eight
migrations started at once spawned eight."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.daemons import REPO, child_env

_MIGRATE_PROBE = """
import json, logging, sys, tempfile
from pathlib import Path
from tests.support.daemon_configs import host_config
from tests.support.daemons import wait_until
from tests.support.sim_vmm import call, sim_daemon_in_process

notes = []
class Notes(logging.Handler):
    def emit(self, record):
        notes.append(record.getMessage())
logging.getLogger("vfiod.linkprior").addHandler(Notes())
logging.getLogger("vfiod.linkprior").setLevel(logging.INFO)

def migration(d):
    return call(d, "status", {"guest": "g1"})["guests"][0]["migration"] or {}

with tempfile.TemporaryDirectory() as tmp:
    with sim_daemon_in_process(Path(tmp, "src"), host_config("source")) as src, \\
            sim_daemon_in_process(Path(tmp, "dst"), host_config("destination")) as dst:
        call(src, "migrate", {"guest": "g1", "to": dst.info.migration_listen})
        wait_until(lambda: migration(src).get("result"), 120, "g1's migration to end")
        result = migration(src)["result"]
        modules = {"pyroute2": "pyroute2" in sys.modules, "asyncio": "asyncio" in sys.modules}
        try:
            wait_until(lambda: notes, 30, "the lookup's answer (or its end) to be logged")
        except AssertionError:
            pass            # the test says what is missing
print(json.dumps({"result": result, **modules, "notes": notes}))
"""


def test_a_migrating_source_never_imports_pyroute2() -> None:
    out = subprocess.run([sys.executable, "-c", _MIGRATE_PROBE], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["result"] == "completed", out.stderr[-2000:]
    assert got["pyroute2"] is False and got["asyncio"] is False
    # the lookup ran in its child: its answer (loopback has no link speed), or, when the
    # migration ended first, that it was stopped
    assert len(got["notes"]) == 1 and got["notes"][0].startswith(
        ("link prior for 127.0.0.1: lo: link speed not supported",
         "link prior for 127.0.0.1: the migration ended before the route lookup")), got


_SHARED_PROBE = """
import json, os, shutil, sys, tempfile
from pathlib import Path
import vfiod.daemon.link_prior_lookup as lookup_module
from tests.support.daemon_configs import host_config
from tests.support.daemons import wait_until
from tests.support.sim_vmm import call, sim_daemon_in_process

tmp = Path(tempfile.mkdtemp())
started, gate = tmp / "started", tmp / "gate"
# a lookup child that says it started, then blocks (reading a FIFO nobody writes) until
# the last migration waiting for it ends and kills it
os.mkfifo(gate)
child = "import sys; open(sys.argv[1], 'a').write('started '); open(sys.argv[2]).read()"
lookup_module.probe_command = lambda: [sys.executable, "-c", child, str(started), str(gate)]

def migration(d, g):
    return call(d, "status", {"guest": g})["guests"][0]["migration"] or {}

def children():
    return started.read_text().count("started") if started.exists() else 0

guests = ("g1", "g2")
with sim_daemon_in_process(tmp / "src", host_config(
        "source", guests=guests, migration='bandwidth_limit = "32MiB"\\n',
        workloads={g: ("1KiB", "4MiB") for g in guests})) as src, \\
        sim_daemon_in_process(tmp / "dst", host_config("destination", guests=guests)) as dst:
    to = dst.info.migration_listen
    # g2 never converges under a cap (daemon_configs): its migration runs until cancelled
    call(src, "migrate", {"guest": "g2", "to": to})
    wait_until(children, 60, "g2's lookup child to start")
    call(src, "migrate", {"guest": "g1", "to": to})
    wait_until(lambda: migration(src, "g1").get("result"), 120, "g1's migration to end")
    call(src, "cancel", {"guest": "g2"})
    wait_until(lambda: migration(src, "g2").get("result"), 120, "g2's migration to end")
    results = {g: migration(src, g)["result"] for g in guests}
print(json.dumps({"results": results, "children": children()}))
shutil.rmtree(tmp)
"""


def test_migrations_to_one_destination_share_one_lookup_child() -> None:
    out = subprocess.run([sys.executable, "-c", _SHARED_PROBE], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["results"] == {"g1": "completed", "g2": "cancelled"}, out.stderr[-2000:]
    # g1 started while g2's lookup ran: it shared that child instead of starting its own
    assert got["children"] == 1, got
