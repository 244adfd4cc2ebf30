"""Reading a TOML file so that every complaint names the key and its line (docs/architecture.md §6
"a bad file is refused with the key and line that is wrong").

``tomllib`` parses but forgets where values came from, so ``KeyLines`` scans the text once
more for table headers (``[a.b]``, ``[[a]]``) and ``key = value`` lines and remembers the
line of each key path, e.g. ``("guest", 1, "ram")`` for the ``ram`` key of the second
``[[guest]]``. ``Table`` wraps one parsed table with its path and offers typed getters
(string, integer, size with units, boolean, choice) that raise ``ConfigError`` as
``FILE:LINE: KEY: what is wrong``. Unknown keys are errors too: a typo must not silently
fall back to a default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

from vfiod.errors import ConfigError

Path = tuple[str | int, ...]

#: What a guest, RAM region, container or workload may be called.
NAME = r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}"
#: A device name: a PCI address (0000:3b:00.1) or an mdev UUID.
DEVICE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}"

_HEADER = re.compile(r"^\s*(\[\[?)\s*(.+?)\s*\]\]?\s*(#.*)?$")
_KEYLINE = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")
_KEYPART = re.compile(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
#: The largest size any key takes: more than any host has, and it fits every 64-bit field.
MAX_SIZE = 1 << 60
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "ki": 1 << 10,
          "m": 1 << 20, "mib": 1 << 20, "mb": 10**6, "mi": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "gi": 1 << 30,
          "t": 1 << 40, "tib": 1 << 40, "tb": 10**12, "ti": 1 << 40}


def _split_key(text: str) -> tuple[str, ...]:
    return tuple(p.strip("\"'") for p in _KEYPART.findall(text))


class KeyLines:
    """Line numbers (1-based) of table headers and keys in TOML text."""

    def __init__(self, text: str) -> None:
        self.lines: dict[Path, int] = {}
        counts: dict[Path, int] = {}
        table: Path = ()
        in_multiline = False
        for number, line in enumerate(text.splitlines(), 1):
            # Skip the inside of multi-line strings: their text is not TOML keys.
            if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
                in_multiline = not in_multiline
                if not in_multiline:
                    continue
            elif in_multiline:
                continue
            m = _HEADER.match(line)
            if m:
                path = self._resolve(_split_key(m.group(2)), counts)
                if m.group(1) == "[[":
                    index = counts.get(path, 0)
                    counts[path] = index + 1
                    table = path + (index,)
                else:
                    table = path
                self.lines.setdefault(table, number)
                continue
            k = _KEYLINE.match(line)
            if k:
                self.lines.setdefault(table + _split_key(k.group(1)), number)

    @staticmethod
    def _resolve(names: tuple[str, ...], counts: dict[Path, int]) -> Path:
        # [[guest.ram]] inside the second [[guest]] is ("guest", 1, "ram"): every enclosing
        # array of tables contributes its current index.
        out: list[str | int] = []
        for i, name in enumerate(names):
            out.append(name)
            if i + 1 < len(names) and tuple(out) in counts:
                out.append(counts[tuple(out)] - 1)
        return tuple(out)

    def line_of(self, path: Path) -> int | None:
        """The line of ``path``, else of its nearest enclosing table that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def dotted(path: Path) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            piece = p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else f'"{p}"'
            out += f".{piece}" if out else piece
    return out or "(top level)"


class Table:
    """One parsed TOML table at ``path``; getters check type and range, naming the key."""

    def __init__(self, data: dict[str, Any], path: Path, lines: KeyLines, source: str) -> None:
        self.data = data
        self.path = path
        self.lines = lines
        self.source = source
        self.used: set[str] = set()

    def error(self, key: str | int | None, message: str) -> ConfigError:
        path = self.path + ((key,) if key is not None else ())
        line = self.lines.line_of(path)
        where = f"{self.source}:{line}" if line else self.source
        return ConfigError(f"{where}: {dotted(path)}: {message}")

    def has(self, key: str) -> bool:
        self.used.add(key)          # asked about: a known key of this table
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.data.get(key, default)

    def table(self, key: str) -> Table:
        v = self.raw(key, {})
        if not isinstance(v, dict):
            raise self.error(key, f"must be a table, not {_kind(v)}")
        return Table(v, self.path + (key,), self.lines, self.source)

    def tables(self, key: str) -> list[Table]:
        """An array of tables (``[[key]]``); absent = empty."""
        v = self.raw(key, [])
        if not isinstance(v, list) or not all(isinstance(t, dict) for t in v):
            raise self.error(key, f"must be an array of tables ([[{key}]]), not {_kind(v)}")
        return [Table(t, self.path + (key, i), self.lines, self.source) for i, t in enumerate(v)]

    def string(self, key: str, default: str | None = None, *, required: bool = False,
               pattern: str | None = None, hint: str = "") -> str | None:
        v = self.raw(key)
        if v is None:
            if required:
                raise self.error(key, "is required" + (f" ({hint})" if hint else ""))
            return default
        if not isinstance(v, str):
            raise self.error(key, f"must be a string, not {_kind(v)}")
        if pattern is not None and not re.fullmatch(pattern, v):
            raise self.error(key, f"{v!r} is not valid" + (f": {hint}" if hint else ""))
        return v

    def choice(self, key: str, choices: Iterable[str], default: str) -> str:
        opts = list(choices)
        v = self.string(key, default)
        if v not in opts:
            raise self.error(key, f"must be one of {opts}, not {v!r}")
        return str(v)

    def boolean(self, key: str, default: bool) -> bool:
        v = self.raw(key, default)
        if not isinstance(v, bool):
            raise self.error(key, f"must be true or false, not {_kind(v)} {v!r}")
        return v

    def integer(self, key: str, default: int | None = None, *, low: int | None = None,
                high: int | None = None, required: bool = False) -> int | None:
        v = self.raw(key)
        if v is None:
            if required:
                raise self.error(key, "is required")
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(key, f"must be an integer, not {_kind(v)} {v!r}")
        self._range(key, v, low, high)
        return v

    def number(self, key: str, default: float | None = None, *, low: float = 0.0,
               high: float | None = None) -> float | None:
        """A positive, finite number (> ``low``)."""
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, float) and not math.isfinite(v):
            raise self.error(key, f"must be a finite number, not {v!r}")
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= low or (
                high is not None and v > high):
            top = f" and at most {high:g}" if high is not None else ""
            raise self.error(key, f"must be a number above {low:g}{top}, not {v!r}")
        return float(v)

    def size(self, key: str, default: int | None = None, *, required: bool = False,
             low: int = 0, high: int = MAX_SIZE, multiple_of: int = 1) -> int | None:
        """Bytes: an integer, or a string with a unit ("512MiB", "4GiB", "64k"), at most
        ``high`` (no size the daemon reads may overflow a 64-bit field)."""
        v = self.raw(key)
        if v is None:
            if required:
                raise self.error(key, "is required (bytes, or a size such as \"4GiB\")")
            return default
        n = parse_size(v)
        if n is None:
            raise self.error(key, f"{v!r} is not a size: write bytes (4096) or a number with "
                             "a unit (\"512MiB\", \"4GiB\")")
        if n > high:
            raise self.error(key, f"{v!r} is {n} bytes, above the limit of {high} bytes "
                             f"({_human(high)})")
        self._range(key, n, low, None)
        if n % multiple_of:
            raise self.error(key, f"{n} bytes is not a multiple of {multiple_of}")
        return n

    def _range(self, key: str, v: int, low: int | None, high: int | None) -> None:
        if low is not None and v < low:
            raise self.error(key, f"{v} is below the minimum {low}")
        if high is not None and v > high:
            raise self.error(key, f"{v} is above the maximum {high}")

    def finish(self) -> None:
        """Refuse keys nobody read: a misspelt key must not fall back to a default."""
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            known = sorted(self.used)
            raise self.error(unknown[0], f"unknown key {unknown[0]!r}"
                             + (f" (this table knows {', '.join(known)})" if known else ""))


def parse_size(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if not isinstance(v, str):
        return None
    m = _SIZE.match(v)
    if not m:
        return None
    unit = (m.group(2) or "").lower()
    if unit not in _UNITS:
        return None
    value = Fraction(m.group(1)) * _UNITS[unit]   # exact: no float overflow or rounding
    return int(value) if value.denominator == 1 else None


def _human(n: int) -> str:
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} bytes"


def _kind(v: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)
