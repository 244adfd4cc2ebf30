"""``vfiod run --backend linux`` in the guest, driven by ``vfiod ctl`` (docs/architecture.md §6;
docs/testing.md "The real-kernel tier"; docs/kernel-contract.md §9.1 mtty, §9.2 edu).

Real processes on the real kernel: two daemons (``python -m vfiod.cli.main run --backend
linux`` over the guest's /sys and /dev), P owning mtty A with guest ``g1`` running, Q
owning mtty B (another IOMMU group) with ``g1`` incoming, both with a migration listener
on 127.0.0.1. Each reports ``READY=1`` on a NOTIFY_SOCKET this test owns (the systemd side,
``tests.support.daemons.NotifySocket``); the operator's questions go through ``vfiod ctl ...
--json`` processes (several at once: each pays seconds of start-up under TCG), polling and
the extra questions through an in-process ``ControlClient``. Nothing sleeps: every wait is
a condition with a deadline.

The two daemons live for the module (under TCG a daemon takes 10-20 s to start and
its first migration ~15 s more of lazy imports), and the tests are one story in file order:

1. P's view of the real host: status, devices (ours and not ours), check;
2. ``vfiod ctl migrate g1`` P → Q: completed, digests verified, the RAM arrived;
3. Q migrates g1 back with a downtime limit it can never meet, and is stopped (SIGTERM)
   in pre-copy: the migration is cancelled, Q exits cleanly, and B, reopened through
   ``vfiod.vfio``, is RUNNING and holds the UART state programmed into A before step 2
   (mtty keeps it in the mdev across opens; a group has one owner at a time, so the
   registers are only readable once Q let go).

Step 3 migrates forward first if step 2 did not run (``Story.migrate_forward``).

The daemons load numba kernels from the cache the host compiled for the guest (rig.py
"numba in the guest"). They run with ``NUMBA_DEBUG_CACHE=1``, so a kernel the host's
warm-up missed shows in their log as "[cache] data saved" and the test fails naming it
(compiled under TCG it would eat most of a test's time limit).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.guest import rig
from tests.kernel.guest.conftest import close_migratable, open_device
from tests.kernel.guest.daemon_pair import GUEST, RAM_BYTES, linux_daemon_pair
from tests.support.daemons import LinuxDaemon, wait_until
from vfiod.api import ApiErrorCode, ClientError
from vfiod.kernel.linux import LinuxKernel
from vfiod.migration.states import MigState
from vfiod.vfio import HostPaths, discover_device

#: the module's daemons start (cold: up to a minute under TCG) inside the first test that
#: runs, and a test run on its own migrates forward first: above the suite's 90 s a test
pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
PAGE = 4096
DEADLINE_S = LinuxDaemon.deadline_s
#: ``vfiod ctl`` exit codes (vfiod/cli/ctl_cmd.py)
EXIT_OK, EXIT_FAILED = 0, 1
NUMBA_COMPILED = "[cache] data saved to"
MTTY_CAPS = ["STOP_COPY", "P2P", "PRE_COPY"]


def journal_outcomes(d: LinuxDaemon) -> list[dict[str, Any]]:
    """The outcome records of a daemon's journal (its ``[paths] state``, which
    ``LinuxDaemon`` puts in its own directory); each line is "<crc32c> <json>"."""
    lines = (d.dir / "state" / "journal").read_text().splitlines()
    recs = [json.loads(ln.split(" ", 1)[1]) for ln in lines]
    return [r for r in recs if r["kind"] == "outcome"]


def assert_nothing_compiled(*daemons: LinuxDaemon) -> None:
    compiled = {d.name: [ln for ln in d.log().splitlines() if NUMBA_COMPILED in ln]
                for d in daemons}
    assert not any(compiled.values()), (
        "the daemons compiled numba kernels the host's warm-up did not cache (extend "
        f"tests/kernel/guest/numba_cache._exercise_numba_paths): {compiled}")


def program_uart(kernel: LinuxKernel, paths: HostPaths, uuid: str, seed: int
                 ) -> tuple[dict[str, int], list[bytes]]:
    """Program an mdev's UARTs through vfiod's objects before a daemon claims it;
    returns (registers, FIFO bytes per port)."""
    o = open_device(kernel, paths, uuid)
    try:
        uart = rig.Uart(o.device)
        progs = uart.program(seed)
        return uart.snapshot(), [p.fifo for p in progs]
    finally:
        close_migratable(o)


def state_after_release(kernel: LinuxKernel, paths: HostPaths, uuid: str
                        ) -> tuple[MigState, dict[str, int], list[bytes]]:
    """Reopen a device a daemon released: the migration state the kernel reports, then
    the UART registers and FIFO contents (all read before any reset)."""
    o = open_device(kernel, paths, uuid)
    try:
        st = o.device.get_mig_state()
        assert isinstance(st, MigState)
        uart = rig.Uart(o.device)
        return st, uart.snapshot(), [uart.drain(p) for p in range(uart.ports)]
    finally:
        close_migratable(o)


@dataclass
class Story:
    p: LinuxDaemon              # owns mtty a; g1 runs here at first
    q: LinuxDaemon              # owns mtty b; g1 incoming, listening on 127.0.0.1
    a: str
    b: str
    p_ram: Path
    q_ram: Path
    ram: bytes                  # g1's RAM before any migration
    uart: dict[str, int]        # what a's UARTs were programmed with
    fifos: list[bytes]
    forward: dict[str, Any] | None = field(default=None)

    def migrate_forward(self) -> dict[str, Any]:
        """``vfiod ctl migrate g1`` P → Q, once; its final migration record."""
        if self.forward is None:
            to = self.q.call("status")["daemon"]["migration_listen"]
            assert to.startswith("127.0.0.1:"), to
            # a generous limit: this proves the daemons' plumbing, not the predictor,
            # whose estimate on a loaded 2-core host can sit just above the default 300 ms
            out = self.p.ctl("migrate", GUEST, "--to", to, "--downtime-limit", "5000")
            self.forward = dict(out["migration"])
        return self.forward


@pytest.fixture(scope="module")
def story(kernel: LinuxKernel, paths: HostPaths, mtty_pair: tuple[str, str],
          numba_cache: None) -> Iterator[Story]:
    a, b = mtty_pair
    programmed: dict[str, Any] = {}

    def prepare(p_ram: Path) -> None:
        # P's RAM: a random MiB and a page near the end; the UARTs are programmed before
        # the daemons own the devices
        with open(p_ram, "r+b") as f:
            f.seek(RAM_BYTES - 3 * PAGE)
            f.write(b"\x5a" * PAGE)
        programmed["uart"], programmed["fifos"] = program_uart(kernel, paths, a, seed=0x3C)
        other, _ = program_uart(kernel, paths, b, seed=0xC3)
        assert other != programmed["uart"]      # so equality afterwards means something

    with linux_daemon_pair(a, b, "d", seed=5, prepare=prepare) as pair:
        yield Story(pair.p, pair.q, a, b, pair.p_ram, pair.q_ram, pair.p_ram.read_bytes(),
                    programmed["uart"], programmed["fifos"])


# -- 1. what a daemon sees of the real host ---------------------------------------------

def test_status_devices_and_check_on_the_real_host(
        kernel: LinuxKernel, paths: HostPaths, story: Story, edu: str) -> None:
    if story.forward is not None:
        pytest.fail("this test describes P before the migration: run it first (file "
                    "order)", pytrace=False)
    p, a, b = story.p, story.a, story.b
    assert p.ready.get("STATUS", "").startswith("1 guest(s) (1 running)"), p.ready
    status, devices, check_g, check_edu = p.ctl_many(
        [["status"], ["devices"], ["check", GUEST], ["check", edu]],
        [EXIT_OK, EXIT_OK, EXIT_OK, EXIT_FAILED])

    assert (status["daemon"]["backend"], status["daemon"]["pid"]) == ("linux", p.proc.pid)
    [g] = status["guests"]
    assert (g["name"], g["state"], g["error"], g["ram_bytes"], g["migration"]) == (
        GUEST, "running", None, RAM_BYTES, None), g
    [dev] = g["devices"]
    assert (dev["name"], dev["protocol"], dev["state_label"], dev["capabilities"]) == (
        a, "v2", "RUNNING", [*MTTY_CAPS, "DMA_LOGGING"]), dev
    # what the open-time probe saw: mtty accepts DMA_LOGGING_START; its REPORT fails on
    # this kernel, so a migration falls back to type1 (test 3 checks the live status)
    assert (dev["tracker"], dev["dma_logging"]) == ("device-logging", True), dev

    # every PCI device and mdev the kernel lists, ours or not, and why
    devs = {x["name"]: x for x in devices["devices"]}
    in_sysfs = set(os.listdir(rig.SYS / "bus" / "pci" / "devices")) | \
        set(os.listdir(rig.SYS / "bus" / "mdev" / "devices"))
    assert set(devs) == in_sysfs
    mine = devs[a]
    assert (mine["kind"], mine["guest"], mine["protocol"], mine["state"],
            mine["vfio_capable"]) == ("mdev", GUEST, "v2", "RUNNING", True), mine
    assert mine["group"] == discover_device(kernel, a, paths).group
    free = devs[b]                  # Q's: P knows nothing of Q, sysfs says it is usable
    assert (free["kind"], free["guest"], free["vfio_capable"]) == ("mdev", None, True), free
    assert free["group"] not in (None, mine["group"]), free
    e = devs[edu]
    assert (e["kind"], e["driver"], e["guest"], e["vfio_capable"]) == (
        "pci", "vfio-pci", None, True), e
    assert (int(e["vendor"], 16), int(e["device"], 16)) == (rig.EDU_VENDOR, rig.EDU_DEVICE)
    # ctl devices says which can migrate: edu, probed on the spot as check does, cannot
    assert (mine["migratable"], mine["migratable_reason"]) == (True, None), mine
    assert (e["migratable"], e["migratable_reason"]) == (
        False, "VFIO_DEVICE_FEATURE MIGRATION: ENOTTY and no v1 migration region"), e
    host_pci = [x for x in devs.values() if x["kind"] == "pci" and x["driver"] != "vfio-pci"]
    assert host_pci, "the guest has PCI devices on host drivers (virtio 9p at least)"
    for x in host_pci:
        assert (x["vfio_capable"], x["guest"]) == (False, None) and x["reason"], x

    # the guest can migrate: mtty speaks v2 with pre-copy and P2P
    assert (check_g["kind"], check_g["target"], check_g["migratable"], check_g["blockers"]) \
        == ("guest", GUEST, True, []), check_g
    [cd] = check_g["devices"]
    assert (cd["name"], cd["protocol"], cd["capabilities"], cd["state"], cd["migratable"]) \
        == (a, "v2", [*MTTY_CAPS, "DMA_LOGGING"], "RUNNING", True), cd
    # edu, probed on the spot: vfio-pci has no migration ops for it, so the kernel
    # answers the MIGRATION feature with ENOTTY, and it has no v1 region either
    assert (check_edu["kind"], check_edu["guest"], check_edu["migratable"],
            check_edu["driver"], check_edu["blockers"]) == (
        "device", None, False, "vfio-pci",
        ["VFIO_DEVICE_FEATURE MIGRATION: ENOTTY and no v1 migration region"]), check_edu

    # the same questions the cheap way (no process start each)
    c = p.call("check", {"target": a})      # the owned device: what the guest probed
    assert (c["kind"], c["guest"], c["migratable"]) == ("device", GUEST, True), c
    # B's group is open in Q: the probe says so, with the kernel's EBUSY
    c = p.call("check", {"target": b})
    assert (c["kind"], c["guest"], c["migratable"]) == ("device", None, False), c
    [why] = c["blockers"]
    assert f"IOMMU group {free['group']} is open in another process" in why and \
        "EBUSY" in why, why
    with pytest.raises(ClientError) as err:
        p.call("check", {"target": "0000:00:1f.7"})
    assert err.value.code is ApiErrorCode.NOT_FOUND and "0000:00:1f.7" in err.value.message
    # the probe of edu released it: this process can open it
    o = open_device(kernel, paths, edu)
    o.container.close()
    assert_nothing_compiled(p, story.q)


# -- 2. a live migration between the two daemons ------------------------------------------

def test_ctl_migrate_to_the_other_daemon_completes_verified(story: Story) -> None:
    p, q = story.p, story.q
    final = story.migrate_forward()
    assert (final["role"], final["result"], final["error"]) == ("source", "completed", None), (
        final, q.journal())
    assert final["verified"] is True, final
    assert final["downtime_s"] is not None and final["predicted_downtime_s"] is not None

    # Q received and verified it and runs it, under the same migration id
    g = q.guest(GUEST)
    m = g["migration"]
    assert (g["state"], m["role"], m["result"], m["verified"], m["id"]) == (
        "running", "destination", "completed", True, final["id"]), g
    assert [(x["name"], x["state_label"]) for x in g["devices"]] == [(story.b, "RUNNING")], g
    # P released the guest and holds it again, fresh, ready to take it back
    g = p.guest(GUEST)
    assert (g["state"], g["migration"]["result"]) == ("incoming", "completed"), g
    assert [(x["name"], x["state_label"]) for x in g["devices"]] == [(story.a, "RUNNING")], g
    # the confirmed switchover, from both journals: Q prepared, then P committed, then
    # Q resumed (docs/protocol.md §8.4)
    steps = sorted(
        (rec["at"], side, rec["outcome"]) for side, d in (("P", p), ("Q", q))
        for rec in journal_outcomes(d) if rec["migration_id"] == final["id"])
    assert [(side, o) for _, side, o in steps] == [
        ("Q", "prepared"), ("P", "committed"), ("Q", "resumed"), ("P", "resumed")], steps
    # the RAM arrived byte for byte in Q's guest; P's was only read
    assert story.q_ram.read_bytes() == story.ram
    assert story.p_ram.read_bytes() == story.ram
    assert_nothing_compiled(p, q)


# -- 3. SIGTERM in the middle of a migration ------------------------------------------------

def test_sigterm_mid_precopy_cancels_and_leaves_the_device_running(
        kernel: LinuxKernel, paths: HostPaths, story: Story) -> None:
    """Q migrates g1 back to P with a downtime limit of 1 ns, which mtty's 96 bytes of
    device state alone exceed, so it stays in pre-copy with B in PRE_COPY until Q is told
    to stop: it cancels, B is back in RUNNING before its fd closes, Q exits 0 and P
    waits for the guest again. Then P stops too."""
    p, q, a, b = story.p, story.q, story.a, story.b
    assert story.migrate_forward()["result"] == "completed", story.forward
    to = p.call("status")["daemon"]["migration_listen"]
    mid = q.call("migrate", {"guest": GUEST, "to": to,
                             "downtime_limit_ms": 1e-6})["migration"]["id"]

    def in_precopy() -> dict[str, Any] | None:
        g = q.guest(GUEST)
        m = g["migration"]
        assert m["id"] == mid and m["result"] is None, f"the migration ended early: {m}"
        if g["devices"][0]["state_label"] != "RUNNING|SAVING" or \
                m["progress"]["phase"] != "precopy" or m["progress"]["iteration"] < 1:
            return None
        return g

    g = wait_until(in_precopy, DEADLINE_S, "a pre-copy pass with B in PRE_COPY")
    # the tracker the migration really runs on: device logging fell back to type1, whose
    # pinned-page scope (an mdev-only container) reports only what devices wrote
    [c] = g["migration"]["live"]["tracker"]["containers"]
    assert (c["tracker"], c["precise"]) == ("type1", True), c
    assert c["fallbacks"][0].startswith("device-logging -> type1: ") and \
        "EOPNOTSUPP" in c["fallbacks"][0], c
    assert p.guest(GUEST)["migration"]["id"] == mid

    assert q.terminate() == 0, q.journal()
    log = q.journal()
    assert f"(source {GUEST}): cancelled" in log, log
    assert f"guest {GUEST}: closing (RUNNING); devices: {b} RUNNING" in log, log
    assert any(m.get("STOPPING") == "1" for m in q.notify.messages), q.notify.messages

    def p_waits_again() -> bool:
        g = p.guest(GUEST)
        m = g["migration"]
        return g["state"] == "incoming" and m["id"] == mid and m["result"] is not None
    wait_until(p_waits_again, DEADLINE_S, "P to discard what it had received")
    assert p.terminate() == 0, p.journal()
    assert f"guest {GUEST}: closing (INMIGRATE); devices: {a} RUNNING" in p.journal(), \
        p.journal()
    assert_nothing_compiled(p, q)

    # what the kernel says now: B is RUNNING and holds the UART state programmed into A
    # before the first migration (carried by it, untouched by the cancelled one)
    st, regs, fifos = state_after_release(kernel, paths, b)
    assert st is MigState.RUNNING
    assert regs == story.uart
    assert fifos == story.fifos
    st, _, _ = state_after_release(kernel, paths, a)
    assert st is MigState.RUNNING
