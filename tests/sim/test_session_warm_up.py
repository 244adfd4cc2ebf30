"""The switchover's warm-up (``session/switchover_warm_up.py``; docs/architecture.md §4):
in a fresh process, a migration's downtime window (the pause to the destination's ACK
resumed) imports no module, gives no numba kernel a new specialisation, and runs no
function of the stream, the control frames or the content digests for the first time.
The probe runs in a subprocess, as a fresh daemon would; with the sessions' warm-up
replaced by a no-op the same probe finds that code's first run in the window."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: code the warm-up rehearses: everything of it that the window runs must have run before
WARMED = ("vfiod/migration/stream/", "vfiod/migration/transport/control.py",
          "vfiod/migration/session/digest.py")

PROBE = """
import json, sys, tempfile, threading
from pathlib import Path

DISABLE = sys.argv[1] == "off"
window = {"on": False, "imports": [], "first": set()}
seen = set()

def audit(event, args):
    if event == "import" and window["on"]:
        window["imports"].append(args[0])

def profile(frame, event, arg):
    if event == "call" and frame.f_code not in seen:
        seen.add(frame.f_code)
        if window["on"]:
            window["first"].add(frame.f_code.co_filename + ":" + frame.f_code.co_qualname)

sys.addaudithook(audit)
from tests.support.session_rig import MiB, SideContainer, migrate, pair, spec
from vfiod.migration.session import dest, switchover_warm_up
from vfiod.migration.session.common import SessionConfig
from vfiod.migration.states import GuestState
from vfiod.migration.transport.control import AckStage
from vfiod.vfio import RamRegion
import numba.core.dispatcher

if DISABLE:
    # the rehearsal alone: the source's bitmap kernels are still warmed
    switchover_warm_up.warm_switchover = dest.warm_switchover = (
        lambda **_: switchover_warm_up.SwitchoverRehearsal())

def specialisations():
    return {f"{m}.{a}": len(v.signatures) for m, mod in list(sys.modules.items())
            if m.startswith("vfiod") and mod is not None
            for a, v in list(vars(mod).items())
            if isinstance(v, numba.core.dispatcher.Dispatcher)}

dev = spec("v2_precopy_log", state_size=64 * 1024, precopy_size=64 * 1024)
src, dst = pair(Path(tempfile.mkdtemp()), [SideContainer([dev])],
                ram=(RamRegion("ram", 0, 1 * MiB),), fill_bytes=256 * 1024)
before = {}

def paused(old, new):
    if new is GuestState.FINISH_MIGRATE and not before:
        before.update(specialisations())
        window["on"] = True

def on_source(s):
    wait = s.link.wait_ack
    def wait_ack(stage, *a, **k):
        try:
            return wait(stage, *a, **k)
        finally:
            if stage is AckStage.RESUMED:
                window["on"] = False
    s.link.wait_ack = wait_ack

src.guest.add_run_state_handler(paused)
sys.setprofile(profile)
threading.setprofile(profile)
try:
    run = migrate(src, dst, SessionConfig(), on_source=on_source)
finally:
    sys.setprofile(None)
    threading.setprofile(None)
    src.close()
    dst.close()
after = specialisations()
print(json.dumps({"result": run.source.result, "imports": window["imports"],
                  "numba": sorted(k for k, n in before.items() if after.get(k) != n),
                  "first": sorted(window["first"])}))
"""


def probe(mode: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300, check=True)
    found: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    found["first"] = [f for f in found["first"]  # type: ignore[union-attr]
                      if any(w in f for w in WARMED)]
    return found


def test_a_fresh_processs_first_downtime_runs_no_code_for_the_first_time() -> None:
    found = probe("on")
    assert found == {"result": "completed", "imports": [], "numba": [], "first": []}, found


def test_without_the_warm_up_the_first_downtime_runs_that_code_first() -> None:
    # the check above can fail: the stream's end and the MANIFEST's check run first here
    found = probe("off")
    assert found["result"] == "completed"
    first = " ".join(found["first"])  # type: ignore[arg-type]
    assert "StreamWriter.finish" in first and "Manifest.from_json" in first, found
