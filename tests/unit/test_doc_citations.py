"""Every document the code cites is in docs/, and every cited section has a heading there.

Citations look like ``docs/kernel-contract.md §6.3``, ``docs/architecture.md §1 step 5``,
``docs/kernel-contract.md §11 pitfall 3``, ranges such as ``§3.6 - §3.9``, and section
titles in quotes such as ``docs/testing.md "The real-kernel tier"``. A section number
right after a document name (in the same clause: up to a ``;``, a ``)``, a sentence end or
a blank line) must be a heading of that document. A bare ``§X.Y`` elsewhere in a file must
be a heading of at least one document that file cites. The old notes that lived outside
the repository may no longer be cited by their bare names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
#: Where citations are looked for (the README and docs/ cross-references included).
SCANNED = ("vfiod", "tests", "native", "systemd", "docs", "README.md", "Makefile",
           "pyproject.toml")
SKIP_PARTS = {"__pycache__", ".cache", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
#: Notes that were never shipped; their bare names must not be cited any more.
RETIRED = ("design", "vfio-uapi", "peers", "testing")

DOC_RE = re.compile(r"docs/([A-Za-z0-9_-]+)\.md")
RETIRED_RE = re.compile(r"(?<![\w/.-])(" + "|".join(map(re.escape, RETIRED)) + r")\.md\b")
_NUM = r"\d+(?:\.\d+)*"
SECTION_RE = re.compile(
    r"§\s*(?P<a>" + _NUM + r")(?:\s*[-–]\s*§?\s*(?P<b>" + _NUM + r"))?"
    r"(?P<tail>\s+(?:steps?|pitfalls?)\s+[\d][\d\s,–-]*(?:and\s+\d+)?)?")
TITLE_RE = re.compile(r'docs/([A-Za-z0-9_-]+)\.md,?\s+(?:#\s*)?"([^"]{1,120})"')
#: What ends the clause a document name governs.
CLAUSE_END_RE = re.compile(r";|\)|\n\s*\n|\.\s")
HEADING_RE = re.compile(r"^#{1,6}\s+(?:(?P<num>" + _NUM + r")\.?\s+)?(?P<title>.+?)\s*$",
                        re.MULTILINE)


@dataclass(frozen=True)
class Doc:
    sections: frozenset[str]
    titles: tuple[str, ...]


def _docs() -> dict[str, Doc]:
    out = {}
    for path in sorted(DOCS.glob("*.md")):
        nums, titles = set(), []
        for m in HEADING_RE.finditer(path.read_text()):
            if m["num"]:
                nums.add(m["num"])
            titles.append(_norm(m["title"]))
        out[path.stem] = Doc(frozenset(nums), tuple(titles))
    return out


def _norm(text: str) -> str:
    """Whitespace and comment leaders of a title wrapped over lines, collapsed."""
    text = re.sub(r"\n\s*(?:#|//|\*)?\s*", " ", text)
    return re.sub(r"\s+", " ", text).strip().removesuffix("...").strip().lower()


def _files() -> list[Path]:
    me = Path(__file__).resolve()
    out = []
    for name in SCANNED:
        top = REPO / name
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for p in paths:
            if p.resolve() == me or SKIP_PARTS & set(p.parts):
                continue
            try:
                p.read_text()
            except (UnicodeDecodeError, OSError):
                continue
            out.append(p)
    return out


def _expand(a: str, b: str | None) -> list[str]:
    """``3.6``..``3.9`` → every number between; different prefixes → both ends."""
    if b is None:
        return [a]
    pa, pb = a.split("."), b.split(".")
    if len(pa) == len(pb) and pa[:-1] == pb[:-1] and int(pa[-1]) <= int(pb[-1]):
        head = ".".join(pa[:-1])
        return [f"{head}.{i}" if head else str(i) for i in range(int(pa[-1]), int(pb[-1]) + 1)]
    return [a, b]


def _sub_numbers(tail: str) -> list[int]:
    """``steps 2, 4-5 and 7`` → [2, 4, 5, 7]."""
    nums: list[int] = []
    for lo, hi in re.findall(r"(\d+)(?:\s*[–-]\s*(\d+))?", tail):
        nums.extend(range(int(lo), int(hi or lo) + 1))
    return nums


def _wanted(m: re.Match[str]) -> list[str]:
    """The headings a section reference needs."""
    wanted = _expand(m["a"], m["b"])
    tail = m["tail"]
    if tail and m["b"] is None and "." not in m["a"]:
        # "§1 step 5" is heading 1.5; "§11 pitfall 3" is heading 11.3. Steps inside a
        # subsection ("§3.1 step 2") are list items, not headings.
        wanted += [f"{m['a']}.{n}" for n in _sub_numbers(tail)]
    return wanted


@dataclass
class Found:
    strict: list[tuple[int, str, str]]        # line, document, section
    loose: list[tuple[int, str]]              # line, section (no document in its clause)
    titles: list[tuple[int, str, str]]        # line, document, title
    cited: set[str]
    missing_docs: list[tuple[int, str]]
    retired: list[tuple[int, str]]


def _scan(path: Path) -> Found:
    text = path.read_text()
    found = Found([], [], [], set(), [], [])
    own = path.stem if path.parent == DOCS else None
    if own:
        found.cited.add(own)

    def line(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    for m in RETIRED_RE.finditer(text):
        found.retired.append((line(m.start()), m.group(0)))
    for m in TITLE_RE.finditer(text):
        found.titles.append((line(m.start()), m[1], _norm(m[2])))
    events = [(m.start(), m.end(), "doc", m) for m in DOC_RE.finditer(text)]
    events += [(m.start(), m.end(), "sec", m) for m in SECTION_RE.finditer(text)]
    current, clause_from = own, -1
    for start, end, kind, m in sorted(events, key=lambda e: e[0]):
        if kind == "doc":
            name = m[1]
            found.cited.add(name)
            if not (DOCS / f"{name}.md").is_file():
                found.missing_docs.append((line(start), m.group(0)))
            current, clause_from = name, end
            continue
        in_clause = clause_from >= 0 and not CLAUSE_END_RE.search(text, clause_from, start)
        # in a document's own text a bare section number refers to that document
        doc = current if in_clause else own
        for sec in _wanted(m):
            if doc is not None:
                found.strict.append((line(start), doc, sec))
            else:
                found.loose.append((line(start), sec))
        if in_clause:
            clause_from = end
        else:
            current, clause_from = own, -1
    return found


FILES = _files()
DOCS_BY_NAME = _docs()


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def test_the_docs_exist() -> None:
    for name in ("architecture", "kernel-contract", "protocol", "testing"):
        assert name in DOCS_BY_NAME, f"docs/{name}.md is missing"


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_citations_resolve(path: Path) -> None:
    f = _scan(path)
    problems = [f"{_rel(path)}:{n}: {what} is not in docs/" for n, what in f.missing_docs]
    problems += [f"{_rel(path)}:{n}: {what} was never shipped; cite docs/ instead"
                 for n, what in f.retired]
    for n, doc, sec in f.strict:
        d = DOCS_BY_NAME.get(doc)
        if d is not None and sec not in d.sections:
            problems.append(f"{_rel(path)}:{n}: docs/{doc}.md has no heading for §{sec}")
    cited = [DOCS_BY_NAME[c] for c in sorted(f.cited) if c in DOCS_BY_NAME]
    for n, sec in f.loose:
        if not cited:
            problems.append(f"{_rel(path)}:{n}: §{sec} but the file cites no document")
        elif not any(sec in d.sections for d in cited):
            names = ", ".join(f"docs/{c}.md" for c in sorted(f.cited))
            problems.append(f"{_rel(path)}:{n}: §{sec} is a heading of none of {names}")
    for n, doc, title in f.titles:
        d = DOCS_BY_NAME.get(doc)
        if d is not None and not any(t.startswith(title) for t in d.titles):
            problems.append(f'{_rel(path)}:{n}: docs/{doc}.md has no section "{title}"')
    assert not problems, "\n".join(problems)


# -- the checker itself -------------------------------------------------------------------

def _check_text(tmp_path: Path, text: str) -> Found:
    p = tmp_path / "mod.py"
    p.write_text(text)
    return _scan(p)


def test_scan_attributes_sections_to_the_document_of_their_clause(tmp_path: Path) -> None:
    f = _check_text(tmp_path, '"""x (docs/architecture.md §1 step 5, §4; '
                              'docs/kernel-contract.md §3.6 - §3.8, §11 pitfall 3).\n\n'
                              'later §6.3 alone."""\n')
    assert f.strict == [(1, "architecture", "1"), (1, "architecture", "1.5"),
                        (1, "architecture", "4"), (1, "kernel-contract", "3.6"),
                        (1, "kernel-contract", "3.7"), (1, "kernel-contract", "3.8"),
                        (1, "kernel-contract", "11"), (1, "kernel-contract", "11.3")]
    assert f.loose == [(3, "6.3")]
    assert f.cited == {"architecture", "kernel-contract"}


def test_scan_reports_retired_names_missing_docs_and_titles(tmp_path: Path) -> None:
    old = "design" + ".md"
    f = _check_text(tmp_path, f'# see {old} §2 and docs/nowhere.md\n'
                              '# docs/testing.md "The real-kernel\n# tier"\n')
    assert f.retired == [(1, old)]
    assert f.missing_docs == [(1, "docs/nowhere.md")]
    assert f.titles == [(2, "testing", "the real-kernel tier")]
