"""Names are unique across the package: one type per concept (issue 9 item 4).

Every class and every module-level type alias (``Bitmap = npt.NDArray[np.uint64]``,
``Sink = Callable[...]``, ``MigState = vfio_device_mig_state``) defined under ``vfiod/`` has
a name no other definition there uses, so a name found in one module means the same thing
everywhere. A second definition of a concept imports the first instead; two concepts get
two names (``ApiErrorCode`` beside the stream's ``ErrorCode``). The simulator is held to
the same rule: its kernel-side records take the kernel's struct names (``VfioDma``).

Run as a script (``python tests/unit/test_unique_names.py``) it lists every name defined
more than once.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vfiod"


def _is_type_name(name: str) -> bool:
    # CamelCase: constants such as ``WORD_BITS`` are not types (nor is ``MiB = 1 << 20``,
    # whose value is no type expression)
    return name[:1].isupper() and any(c.islower() for c in name[1:])


def _is_alias(value: ast.expr) -> bool:
    """A value that names a type: ``X``, ``mod.X``, ``X[...]`` or a union ``X | Y``."""
    if isinstance(value, ast.Name | ast.Attribute | ast.Subscript):
        return True
    return isinstance(value, ast.BinOp) and isinstance(value.op, ast.BitOr)


def type_definitions(root: Path = PACKAGE) -> dict[str, list[str]]:
    """Type name -> ``path:line`` of each definition under ``root``."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        where = path.relative_to(root.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                found[node.name].append(f"{where}:{node.lineno}")
        for stmt in tree.body:
            targets: list[ast.expr] = []
            if isinstance(stmt, ast.Assign) and _is_alias(stmt.value):
                targets = stmt.targets
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None \
                    and _is_alias(stmt.value):
                targets = [stmt.target]
            for t in targets:
                if isinstance(t, ast.Name) and _is_type_name(t.id):
                    found[t.id].append(f"{where}:{stmt.lineno}")
    return dict(found)


def duplicates(root: Path = PACKAGE) -> dict[str, list[str]]:
    return {name: places for name, places in sorted(type_definitions(root).items())
            if len(places) > 1}


def test_every_type_name_is_defined_once() -> None:
    dups = duplicates()
    assert not dups, "type names defined more than once under vfiod/:\n" + "\n".join(
        f"  {name}: {', '.join(places)}" for name, places in dups.items())


def test_the_check_sees_classes_and_aliases(tmp_path: Path) -> None:
    pkg = tmp_path / "vfiod"
    (pkg / "a").mkdir(parents=True)
    (pkg / "a" / "one.py").write_text(
        "import numpy as np\nBitmap = np.ndarray\nclass Sink:\n    class Inner: ...\n"
        "MiB = 1 << 20\nWORDS = 64\n")
    (pkg / "two.py").write_text(
        "from collections.abc import Callable\nSink = Callable[[bytes], None]\n"
        "Bitmap: type = list[int]\nMiB = 1 << 20\ndef f() -> None:\n    class Inner: ...\n")
    assert duplicates(pkg) == {
        "Bitmap": ["vfiod/a/one.py:2", "vfiod/two.py:3"],
        "Inner": ["vfiod/a/one.py:4", "vfiod/two.py:6"],
        "Sink": ["vfiod/a/one.py:3", "vfiod/two.py:2"],
    }


if __name__ == "__main__":
    found = duplicates()
    for name, places in found.items():
        print(f"{name}: {', '.join(places)}")
    sys.exit(1 if found else 0)
