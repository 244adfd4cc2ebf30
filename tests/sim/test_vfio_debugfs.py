"""Reading an observed device's migration state (vfiod/vfio/debugfs.py,
docs/kernel-contract.md §12): state names, unknown text, and why a state is unreadable."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest

from tests.support.sim_mig_rig import specs
from vfiod.errors import KernelError
from vfiod.kernel.sim import SimHost
from vfiod.vfio.debugfs import KNOWN_STATES, PROBLEMS, parse_state_text, read_migration_state

V2 = "0000:3b:00.2"
PLAIN = "0000:3b:00.3"


@pytest.fixture
def host(tmp_path: Path) -> SimHost:
    caps = specs()
    return SimHost.build(tmp_path, [[dataclasses.replace(caps["v2_p2p"], name=V2)],
                                    [dataclasses.replace(caps["not_migratable"], name=PLAIN)]])


def test_every_kernel_state_name_is_known() -> None:
    assert KNOWN_STATES == {"ERROR", "STOP", "RUNNING", "STOP_COPY", "RESUMING",
                            "RUNNING_P2P", "PRE_COPY", "PRE_COPY_P2P"}
    for name in KNOWN_STATES:
        r = parse_state_text(V2, f"{name}\n")
        assert (r.state, r.raw, r.readable, r.reason) == (name, name, True, "")


@pytest.mark.parametrize("text,raw", [("Invalid\n", "Invalid"), ("", ""),
                                      ("running\n", "running"),
                                      ("STOP\x1b[2J" + "x" * 100, "STOP?[2J" + "x" * 56)])
def test_other_text_is_unknown_kept_short_and_printable(text: str, raw: str) -> None:
    r = parse_state_text(V2, text)
    assert (r.state, r.raw, r.readable) == ("unknown", raw, True)
    assert repr(raw) in r.reason


@pytest.mark.parametrize("mode,device,problem,words", [
    ("vfio", PLAIN, "no-migration", "no migration support"),
    ("vfio", "0000:3b:00.9", "no-device", "not bound to a VFIO driver"),
    ("no-vfio", V2, "no-vfio-debugfs", "CONFIG_VFIO_DEBUGFS"),
    ("unmounted", V2, "no-debugfs", "not mounted"),
    ("denied", V2, "denied", "CAP_DAC_READ_SEARCH"),
])
def test_an_unreadable_state_names_what_is_missing(host: SimHost, mode: str, device: str,
                                                   problem: str, words: str) -> None:
    host.kernel.debugfs.set_mode(mode)
    r = read_migration_state(host.kernel, device)
    assert (r.state, r.problem, r.readable) == (None, problem, False)
    assert words in r.reason and problem in PROBLEMS


def test_a_driver_that_cannot_say_is_unreadable(host: SimHost) -> None:
    host.kernel.faults.inject("debugfs:state", errno.EINVAL)
    r = read_migration_state(host.kernel, V2)
    assert r.problem == "unreadable" and "EINVAL" in r.reason and "driver" in r.reason
    assert read_migration_state(host.kernel, V2).state == "RUNNING"


class _Lockdown:
    """A kernel whose reads fail with EPERM (as a locked-down kernel answers a debugfs
    file that is not read-only for everyone), and whose listings are fine."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def read_debugfs(self, relpath: str) -> str:
        raise KernelError(errno.EPERM, f"read({relpath})")

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_eperm_is_denied_too(host: SimHost) -> None:
    r = read_migration_state(_Lockdown(host.kernel), V2)  # type: ignore[arg-type]
    assert r.problem == "denied" and "EPERM" in r.reason
