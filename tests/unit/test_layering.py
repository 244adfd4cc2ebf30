"""docs/architecture.md §2: imports point down only, and only kernel/linux.py makes syscalls."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "vfiod"

# Rank of each top-level part of the package: a module may import only ranks <= its own.
# The leaves (errors, api, abi) import nothing of vfiod above them.
RANK = {
    "errors": 0, "api": 0, "abi": 0, "__init__": 0,
    "kernel": 1, "vfio": 2, "dirty": 3, "migration": 4, "daemon": 5, "cli": 6,
}

# Inside vfiod/migration/ the same rule holds between its packages (README "Architecture"):
# the state vocabulary, then the stream format and its transports, then device protocols and
# planning, then the guest, then the sessions that drive all of them.
MIGRATION_RANK = {
    "__init__": 0, "states": 0, "stream": 1, "transport": 2, "device": 3, "planning": 4,
    "guest": 5, "session": 6,
}

# Calls that are syscalls: allowed only in kernel/linux.py.
SYSCALL_ATTRS = {
    ("fcntl", "ioctl"), ("os", "pread"), ("os", "pwrite"), ("os", "memfd_create"),
    ("os", "readv"), ("os", "preadv"), ("os", "writev"), ("mmap", "mmap"),
}
SYSCALL_MODULE = ROOT / "kernel" / "linux.py"


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py"))


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[0].removesuffix(".py")


def _imported_modules(path: Path) -> list[tuple[int, list[str]]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module.split(".")))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; name the package")
    return out


def _imported_parts(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "vfiod" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path) -> None:
    mine = _part(path)
    assert mine in RANK, f"{path}: top-level part {mine!r} has no layer rank; add it to RANK"
    for lineno, target in _imported_parts(path):
        assert target in RANK, f"{path}:{lineno} imports unknown part vfiod.{target}"
        if target == mine:
            continue
        assert RANK[target] <= RANK[mine] and not (RANK[target] == RANK[mine] and mine != target
                                                    and RANK[mine] > 0), (
            f"{path}:{lineno}: layer {mine} (rank {RANK[mine]}) imports vfiod.{target} "
            f"(rank {RANK[target]}): upward or sideways edge")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_linux_backend_makes_syscalls(path: Path) -> None:
    if path == SYSCALL_MODULE:
        return
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert (node.value.id, node.attr) not in SYSCALL_ATTRS, (
                f"{path}:{node.lineno}: {node.value.id}.{node.attr} is a syscall; "
                "go through KernelOps (vfiod/kernel/linux.py)")


def test_layering_check_catches_an_upward_edge(tmp_path: Path) -> None:
    # The checker itself must be able to fail: a vfio/ module importing migration/.
    bad = tmp_path / "bad.py"
    bad.write_text("import vfiod.migration.session.common\nfrom vfiod.daemon import x\n")
    parts = [t for _, t in _imported_parts(bad)]
    assert parts == ["migration", "daemon"]
    assert any(RANK[t] > RANK["vfio"] for t in parts)


def _migration_part(parts: tuple[str, ...] | list[str]) -> str:
    return parts[0].removesuffix(".py")


def _migration_edges(path: Path, mine: str) -> list[str]:
    """Every import of ``path`` (in migration part ``mine``) that breaks MIGRATION_RANK."""
    bad = []
    for lineno, parts in _imported_modules(path):
        if parts[:2] != ["vfiod", "migration"] or len(parts) < 3:
            continue
        target = parts[2]
        if target not in MIGRATION_RANK:
            bad.append(f"{path}:{lineno}: imports unknown vfiod.migration.{target}")
        elif target != mine and MIGRATION_RANK[target] >= MIGRATION_RANK[mine]:
            bad.append(f"{path}:{lineno}: migration/{mine} imports vfiod.migration.{target}: "
                       "upward or sideways edge inside migration/")
    return bad


@pytest.mark.parametrize("path", sorted((ROOT / "migration").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_migration_packages_point_down(path: Path) -> None:
    mine = _migration_part(path.relative_to(ROOT / "migration").parts)
    assert mine in MIGRATION_RANK, f"{path}: migration part {mine!r} has no rank; add it"
    assert _migration_edges(path, mine) == []


def test_migration_check_catches_an_upward_edge(tmp_path: Path) -> None:
    # The checker itself must be able to fail: device/ importing session/ (upward),
    # planning/ importing guest/ (upward) and an unknown part; device/ importing stream/ is fine.
    bad = tmp_path / "bad.py"
    bad.write_text("from vfiod.migration.session.source import SourceSession\n"
                   "import vfiod.migration.guest.model\n"
                   "from vfiod.migration.stream import StreamWriter\n"
                   "from vfiod.migration.nowhere import x\n")
    assert len(_migration_edges(bad, "device")) == 3
    assert [e.split(":")[1] for e in _migration_edges(bad, "device")] == ["1", "2", "4"]
    assert _migration_edges(bad, "session")[0].endswith("imports unknown vfiod.migration.nowhere")
