"""A VMM hands its guest to vfiod and sees it migrated, on the real kernel
(docs/architecture.md §8.1; docs/kernel-contract.md §9.1 mtty).

Two daemons (``vfiod run --backend linux``), P with guest ``g1`` running, Q with ``g1``
incoming, both configured to take ``g1``'s RAM and its device from its VMM. Two VMM
processes (tests/support/vmm_shim.py) each open an mtty mdev the legacy way, put guest
RAM in a memfd, map it for DMA and hand RAM, container, group and device over with
``attach`` (SCM_RIGHTS). The test first records what Linux says of those fds (the facts
vfiod's checks rely on: a group is a character device whose /sys/dev/char link names it;
a device fd is ``anon_inode:[vfio-device]`` whose fdinfo does not name its device).
A ``migrate`` request moves the guest from P to Q; meanwhile and afterwards each VMM
keeps reading its device through its own fd: the source's stopped, the destination's
running, and the destination RAM is the source RAM. After ``detach`` the VMM's device
still answers.
"""

from __future__ import annotations

import json
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.guest import rig
from tests.support.daemons import REPO, LinuxDaemon, child_env, wait_until

#: two daemons and two VMM processes start under TCG (each pays Python start-up)
pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
RAM_BYTES = 8 * MiB
GUEST = "g1"


def _config(device: str, start: str) -> str:
    return ('[migration]\nlisten = "127.0.0.1:0"\n'
            f'\n[[guest]]\nname = "{GUEST}"\nstart = "{start}"\n'
            f'[[guest.ram]]\nname = "ram"\nsize = "{RAM_BYTES // MiB}MiB"\nfrom = "vmm"\n'
            f'[[guest.device]]\nname = "{device}"\nid = "uart0"\nfrom = "vmm"\n')


class VmmProcess:
    """One tests/support/vmm_shim.py process; ``facts``: its first line."""

    deadline_s = 120.0

    def __init__(self, socket: str, device: str, fill: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.vmm_shim", "--socket", socket,
             "--guest", GUEST, "--device", device, "--ram-size", str(RAM_BYTES),
             "--fill", str(fill)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
            env=child_env())
        self.facts: dict[str, Any] = {}

    def wait_ready(self) -> None:
        """Its device and RAM are set up; ``facts``: what the kernel says of its fds."""
        self.facts = self._line()["facts"]

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.deadline_s
        while not sel.select(max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise AssertionError(f"the VMM said nothing for {self.deadline_s:g} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the VMM exited ({self.proc.wait()})")
        return dict(json.loads(line))

    def cmd(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        out = self._line()
        assert out["ok"], out
        return out

    def quit(self) -> None:
        if self.proc.poll() is None:
            try:
                if self.facts:
                    self.cmd("quit")
            finally:
                self.proc.kill()
                self.proc.wait(self.deadline_s)


@pytest.fixture()
def two_sides(mtty_pair: tuple[str, str], numba_cache: None
              ) -> Iterator[tuple[LinuxDaemon, LinuxDaemon, VmmProcess, VmmProcess, str]]:
    """P and Q, each with its VMM process; all four start at once (their Python
    start-ups overlap under TCG)."""
    a, b = mtty_pair
    work = Path(tempfile.mkdtemp(prefix="vfiod-h-"))
    daemons: list[LinuxDaemon] = []
    vmms: list[VmmProcess] = []
    try:
        rig.loopback_up()
        daemons.append(LinuxDaemon("P", _config(a, "running"), work))
        daemons.append(LinuxDaemon("Q", _config(b, "incoming"), work))
        vmms.append(VmmProcess(daemons[0].socket, a, fill=7))
        vmms.append(VmmProcess(daemons[1].socket, b, fill=0))
        for d in daemons:
            d.wait_ready()
        for v in vmms:
            v.wait_ready()
        yield daemons[0], daemons[1], vmms[0], vmms[1], a
    finally:
        for d in daemons:       # first: a VMM's group detaches only once no copy is open
            d.kill()
        for v in vmms:
            v.quit()
        shutil.rmtree(work, ignore_errors=True)


def test_a_vmm_hands_its_device_over_and_sees_it_migrated(two_sides) -> None:
    p, q, src, dst, a = two_sides
    try:
        # what Linux 6.12 says of the fds (vfiod/vfio/handover.py relies on it)
        f = src.facts
        assert f["container"]["sys"].endswith("virtual/misc/vfio"), f
        assert f["group"]["sys"].endswith(f"virtual/vfio/{f['group_number']}"), f
        assert f["device"]["link"] == "anon_inode:[vfio-device]", f
        assert "rdev" not in f["device"] and "syspath" not in f["device"]["fdinfo"], f
        print("kernel facts of a VMM's VFIO fds:", json.dumps(f, indent=1))
        before = src.cmd("use")
        assert before["state"] == "RUNNING", before
        r = src.cmd("attach")["result"]
        assert (r["state"], r["devices"], r["ram"]) == ("running", [a], ["ram"]), r
        assert dst.cmd("attach")["result"]["state"] == "incoming"
        assert src.cmd("use") == before          # the VMM still uses its device
        to = q.call("status")["daemon"]["migration_listen"]
        # through the control socket in-process: a `vfiod ctl` process pays seconds of
        # start-up under TCG (tests/kernel/guest/test_daemon.py drives ctl itself)
        p.call("migrate", {"guest": GUEST, "to": to, "downtime_limit_ms": 5000})
        out = wait_until(lambda: (p.guest(GUEST)["migration"] or {}).get("result")
                         and p.guest(GUEST)["migration"], p.deadline_s, "the migration")
        assert (out["result"], out["verified"]) == ("completed", True), out
        wait_until(lambda: q.guest(GUEST)["state"] == "running", q.deadline_s,
                   "g1 to run on Q")
        assert dst.cmd("ram")["sha256"] == src.cmd("ram")["sha256"]
        after = dst.cmd("use")
        assert after == {**before, "ok": True, "state": "RUNNING"}, after
        assert src.cmd("use")["state"] == "STOP"     # the source VMM sees its device stopped
        wait_until(lambda: p.guest(GUEST)["state"] == "defined", p.deadline_s,
                   "g1 released on P")
        assert q.call("detach", {"guest": GUEST})["state"] == "defined"
        assert dst.cmd("use")["state"] == "RUNNING"  # vfiod closed only its copies
    except AssertionError:
        print(p.journal(), q.journal(), sep="\n--- Q ---\n")
        raise
