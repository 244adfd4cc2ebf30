"""The bandwidth prior looked up in a child process (``daemon/link_prior_lookup.py``,
``linkprior_probe.py``; docs/architecture.md §4): the real child's answer on loopback is
``link_prior``'s; while it runs the prior is "unknown" and says so; a child that cannot be
started, fails, prints something else or hangs gives an "unknown" prior naming what
happened, and every child is reaped with its pipes closed."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemons import wait_until
from vfiod.daemon.link_prior_lookup import LinkPriorLookup
from vfiod.migration.planning.linkprior import (
    LinkPrior,
    link_prior,
    prior_from_json,
    prior_to_json,
)
from vfiod.migration.planning.linkprior_probe import USAGE, main
from vfiod.migration.planning.predictor import DEFAULT_BANDWIDTH_BPS, BandwidthEstimator

DEST = "127.0.0.1"


def _python(code: str) -> list[str]:
    """A child running ``code`` instead of the probe (the destination is its argv[1])."""
    return [sys.executable, "-c", code]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture()
def no_leaks() -> Iterator[list[LinkPriorLookup]]:
    """The lookups a test makes; afterwards each child was reaped (no zombie) and no fd
    of this process is left open."""
    before = _open_fds()
    made: list[LinkPriorLookup] = []
    yield made
    for lookup in made:
        lookup.close()
        assert lookup.answered
        if lookup.pid is not None:
            with pytest.raises(ChildProcessError):        # reaped: not a child any more
                os.waitpid(lookup.pid, os.WNOHANG)
    assert not _open_fds() - before, "a pipe to a child was left open"


def _answer(made: list[LinkPriorLookup], command: list[str] | None = None,
            timeout_s: float = 60.0) -> LinkPrior:
    lookup = LinkPriorLookup(DEST, command=command, timeout_s=timeout_s).start()
    made.append(lookup)
    wait_until(lambda: lookup.answered, 60, "the lookup's answer")
    return lookup.current()


# -- the child's answer ------------------------------------------------------------------

def test_the_answer_travels_as_one_line_of_json() -> None:
    for prior in (LinkPrior("192.0.2.7", "ens1", 25000e6 / 8, 9000, "ens1 25000 Mb/s"),
                  LinkPrior(DEST, "lo", None, 65536, "lo: link speed not supported (x\x00)"),
                  LinkPrior("198.51.100.1", None, None, None, "no route")):
        line = prior_to_json(prior)
        assert "\n" not in line and prior_from_json(line) == prior


@pytest.mark.parametrize(("text", "why"), [
    ("hello", "not JSON"),
    ("[1, 2]", "expected the fields"),
    ('{"destination": "x"}', "got ['destination']"),
    ('{"destination": "x", "ifname": 3, "speed_bps": null, "mtu": null, "note": ""}',
     "ifname is 3"),
    ('{"destination": "x", "ifname": null, "speed_bps": true, "mtu": null, "note": ""}',
     "speed_bps is True"),
    ('{"destination": "x", "ifname": null, "speed_bps": -5, "mtu": null, "note": ""}',
     "not a positive rate"),
    ('{"destination": "x", "ifname": null, "speed_bps": NaN, "mtu": null, "note": ""}',
     "not a positive rate"),
])
def test_anything_else_is_refused_with_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(ValueError, match="not") as e:
        prior_from_json(text)
    assert why in str(e.value)


def test_the_probe_prints_the_prior_and_refuses_a_wrong_command_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main([DEST]) == 0
    assert prior_from_json(capsys.readouterr().out) == link_prior(DEST)
    assert main([]) == 2 and main([DEST, DEST]) == 2
    assert capsys.readouterr().err == f"{USAGE}\n{USAGE}\n"


def test_the_child_answers_as_link_prior_does_on_the_real_loopback(no_leaks) -> None:
    got = _answer(no_leaks)
    assert got == link_prior(DEST) and got.ifname == "lo" and got.speed_bps is None


def test_the_child_runs_this_package_whatever_its_path_says(
        no_leaks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # another vfiod first on the inherited path: the child still imports this one
    (tmp_path / "vfiod").mkdir()
    (tmp_path / "vfiod" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    got = _answer(no_leaks, _python("import vfiod; print(vfiod.__file__)"))
    mine = str(Path(__file__).resolve().parents[2] / "vfiod" / "__init__.py")
    assert f"answered {mine!r}: not JSON" in got.note, got.note


def test_the_child_runs_this_package_whatever_directory_the_daemon_runs_in(
        no_leaks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a daemon started where another vfiod/ lies: ``python -m`` would import that first
    (tmp_path / "vfiod").mkdir()
    (tmp_path / "vfiod" / "__init__.py").write_text('raise ImportError("the other vfiod")\n')
    monkeypatch.chdir(tmp_path)
    got = _answer(no_leaks)
    assert got == link_prior(DEST), got.note


# -- before the answer -------------------------------------------------------------------

def test_while_the_child_runs_the_prior_is_unknown_and_says_so(no_leaks) -> None:
    lookup = LinkPriorLookup(DEST, command=_python("import signal; signal.pause()"))
    no_leaks.append(lookup.start())
    bw = BandwidthEstimator(lookup.current)
    assert not lookup.answered
    assert lookup.current().speed_bps is None
    assert bw.bps == DEFAULT_BANDWIDTH_BPS
    assert bw.source == ("default 125.0 MB/s (link speed unknown: the route lookup for "
                         f"{DEST} is still running (a child process))"), bw.source
    wait_until(lambda: lookup.pid is not None, 60, "the child to start")
    lookup.close()                      # the migration ended first: killed and reaped
    assert lookup.answered
    assert lookup.current().note == "the migration ended before the route lookup answered"


def test_the_estimator_takes_the_prior_when_it_arrives() -> None:
    answers: list[LinkPrior] = []

    def current() -> LinkPrior:
        return answers[-1] if answers else LinkPrior(DEST, None, None, None, "running")

    bw = BandwidthEstimator(current)
    assert bw.bps == DEFAULT_BANDWIDTH_BPS and "running" in bw.source
    answers.append(LinkPrior(DEST, "ens1", 1.25e9, 1500, "ens1 10000 Mb/s"))
    assert bw.bps == 1.25e9 and bw.source == "link prior: ens1 10000 Mb/s"
    bw.record(0.0, 0.1, 100_000_000)    # measured: the prior no longer matters
    assert math.isclose(bw.bps, 1e9)


def test_closing_before_the_start_spawns_nothing(no_leaks) -> None:
    lookup = LinkPriorLookup(DEST)
    no_leaks.append(lookup)
    lookup.close()
    lookup.start()
    wait_until(lambda: lookup.answered, 60, "the answer")
    assert lookup.pid is None
    assert lookup.current().note == "the migration ended before the route lookup started"


# -- faults ------------------------------------------------------------------------------

def test_a_missing_python_is_an_unknown_prior(no_leaks) -> None:
    got = _answer(no_leaks, ["/nonexistent/vfiod-python3", "-m", "x"])
    assert got == LinkPrior(DEST, None, None, None, "cannot start the route lookup's child "
                            "process (/nonexistent/vfiod-python3): [Errno 2] No such file or "
                            "directory: '/nonexistent/vfiod-python3'")


def test_a_failing_child_is_an_unknown_prior_quoting_its_last_error(no_leaks) -> None:
    got = _answer(no_leaks, _python("import sys; print('x', file=sys.stderr); "
                                    "sys.exit('RTNETLINK: Operation not permitted')"))
    assert got.speed_bps is None and got.note == (
        "the route lookup's child process failed with exit status 1 (stderr: "
        "'RTNETLINK: Operation not permitted')")
    got = _answer(no_leaks, _python("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"))
    assert got.note == ("the route lookup's child process was killed by SIGSEGV "
                        "(stderr: '')")


@pytest.mark.parametrize(("out", "why"), [
    ("no JSON here", "answered 'no JSON here': not JSON"),
    ("", "answered '': not JSON"),
    ('{"destination": "127.0.0.1"}', "not a LinkPrior: expected the fields"),
    (prior_to_json(LinkPrior("192.0.2.9", None, None, None, "x")),
     "answered for '192.0.2.9', not '127.0.0.1'"),
])
def test_garbage_from_the_child_is_an_unknown_prior(no_leaks, out: str, why: str) -> None:
    got = _answer(no_leaks, _python(f"print({out!r})"))
    assert got.speed_bps is None and got.ifname is None and why in got.note, got.note


def test_a_hanging_child_is_killed_after_the_timeout(no_leaks) -> None:
    lookup = LinkPriorLookup(DEST, command=_python("import signal; signal.pause()"),
                             timeout_s=0.3)
    no_leaks.append(lookup.start())
    wait_until(lambda: lookup.answered, 60, "the timeout")
    assert lookup.current().note == ("the route lookup's child process gave no answer "
                                     "within 0.3 s and was killed")
    pid = lookup.pid
    assert pid is not None and not Path(f"/proc/{pid}").exists()
