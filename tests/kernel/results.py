"""Turn the guest suite's junit XML into one verdict per guest test function.

The host cannot import the guest test modules to collect them (they need the guest), so
it lists their test functions statically (``ast``); the guest's pytest writes junit XML to
the results share; each host test then looks up the cases of its guest function
(all parametrizations of it) and reports the guest's outcome under the guest's name.
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

#: ``make kernel-bench`` (tests/kernel/bench.py) on the results share: the runs per case
#: the host asks for (the guest's environment is init.sh's, not the host's), and the
#: figures the guest writes back
KERNEL_BENCH_RUNS_FILE = "kernel-bench-runs"
KERNEL_BENCH_RESULT_FILE = "kernel-bench.json"
#: ... and the production daemons' memory after a migration (bench_native_dma_rss.py)
KERNEL_RSS_RESULT_FILE = "kernel-rss.json"


@dataclass(frozen=True)
class CaseResult:
    """One junit ``testcase``: outcome "passed" | "failed" | "skipped" with its text."""

    classname: str
    name: str
    outcome: str
    message: str = ""
    text: str = ""


@dataclass(frozen=True)
class Verdict:
    outcome: str        # "passed" | "failed" | "skipped"
    message: str


def discover_guest_tests(guest_dir: Path) -> list[str]:
    """``file.py::func`` / ``file.py::Class::method`` for every test in ``guest_dir``
    (paths relative to it), in file order."""
    out: list[str] = []
    for path in sorted(guest_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and \
                    node.name.startswith("test"):
                out.append(f"{path.name}::{node.name}")
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and \
                            item.name.startswith("test"):
                        out.append(f"{path.name}::{node.name}::{item.name}")
    return out


def parse_junit(path: Path) -> list[CaseResult]:
    """Every testcase of a pytest junit XML file ([] if the file is missing)."""
    if not path.exists():
        return []
    root = ET.parse(path).getroot()
    cases = []
    for tc in root.iter("testcase"):
        outcome, message, text = "passed", "", ""
        bad = [c for c in tc if c.tag in ("failure", "error")]
        skipped = [c for c in tc if c.tag == "skipped"]
        if bad:
            outcome = "failed"
            message = "; ".join(f"{c.tag}: {c.get('message', '')}" for c in bad)
            text = "\n".join((c.text or "") for c in bad)
        elif skipped:
            outcome = "skipped"
            message = skipped[0].get("message", "")
        cases.append(CaseResult(tc.get("classname", ""), tc.get("name", ""), outcome,
                                message, text))
    return cases


def _key(classname: str, name: str) -> tuple[str, str]:
    """(module file, [Class::]function) of a junit case, in discover_guest_tests' terms."""
    base = name.split("[", 1)[0]
    parts = classname.split(".")
    # classname is the dotted module path, plus the class name for methods
    if parts and parts[-1].startswith("Test"):
        return f"{parts[-2]}.py", f"{parts[-1]}::{base}"
    return f"{parts[-1]}.py", base


def group_by_function(cases: list[CaseResult],
                      known: list[str]) -> dict[str, list[CaseResult]]:
    """Cases keyed by guest test id. A module that failed to import is reported by pytest
    as a case named after the module with an empty classname: every test of that file
    gets that case, so its host test fails quoting the import error."""
    out: dict[str, list[CaseResult]] = {k: [] for k in known}
    for c in cases:
        if not c.classname:
            module = c.name.rsplit(".", 1)[-1] + ".py"
            for k in known:
                if k.startswith(module + "::"):
                    out[k].append(c)
            continue
        module, func = _key(c.classname, c.name)
        out.setdefault(f"{module}::{func}", []).append(c)
    return out


def verdict(test_id: str, cases: list[CaseResult], limit: int = 6000) -> Verdict:
    if not cases:
        return Verdict("failed", f"guest test {test_id} did not run in the guest (see "
                       "test_guest_suite_passed for the guest's output)")
    failed = [c for c in cases if c.outcome == "failed"]
    if failed:
        body = "\n\n".join(f"[{c.name}] {c.message}\n{c.text}" for c in failed)
        if len(body) > limit:
            body = body[:limit] + "\n... (truncated)"
        return Verdict("failed", f"guest test {test_id} failed in the guest:\n{body}")
    if all(c.outcome == "skipped" for c in cases):
        return Verdict("skipped", f"guest test {test_id} skipped in the guest: "
                       + "; ".join(c.message for c in cases))
    return Verdict("passed", "")


def tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])
