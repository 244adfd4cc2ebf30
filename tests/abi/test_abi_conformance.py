"""Every ctypes size, field offset, ioctl number and constant in vfiod.abi equals what gcc
sees in real kernel headers (docs/testing.md abi tier; docs/kernel-contract.md §0 - §7): the system's
6.1 headers and Debian's 6.12 uAPI headers, one test id per key and header set."""

from __future__ import annotations

import ctypes

import pytest

from tests.abi import expected
from tests.abi.conftest import Probed

ENTRIES = expected.entries()


def _ids(entries: list[expected.Entry]) -> list[str]:
    # Several Python names may claim one key (VFIO_DEVICE_STATE_STOP and MigState.STOP):
    # each claim is its own test, told apart by the Python name.
    keys = [e.key for e in entries]
    return [e.key if keys.count(e.key) == 1 else f"{e.key}~{e.name}" for e in entries]


IDS = _ids(ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_matches_header(entry: expected.Entry, header_probe: Probed) -> None:
    problem = expected.judge(entry, header_probe.data, header_probe.name,
                             header_probe.version)
    assert problem is None, problem


def test_test_ids_are_unique() -> None:
    # Each claim must be reported under its own name when it fails.
    dupes = sorted({i for i in IDS if IDS.count(i) > 1})
    assert not dupes, f"duplicate conformance test ids: {dupes}"


def test_probe_knows_which_headers_it_saw(all_probes: list[Probed]) -> None:
    by_name = {p.headers.name: p for p in all_probes}
    assert all_probes[0].data["meta.has_iommufd"] == 0, (
        f"{all_probes[0].name}: the system headers unexpectedly have <linux/iommufd.h>; "
        "update MODULE_SINCE/the header-set list")
    assert all_probes[1].data["meta.has_iommufd"] == 1, (
        f"{all_probes[1].name}: the 6.12 include dir lacks linux/iommufd.h ({sorted(by_name)})")


def test_every_struct_is_checked_against_some_header(all_probes: list[Probed]) -> None:
    """Coverage: each ctypes struct in any vfiod.abi module, and each of its fields, has
    an entry in at least one real header set."""
    seen: set[str] = set().union(*(p.data.keys() for p in all_probes))
    missing: list[str] = []
    for name, st in sorted(expected.abi_structs().items()):
        if f"struct.{name}.sizeof" not in seen:
            missing.append(f"struct {name}")
            continue
        fields = [f[0] for f in st._fields_]
        flex = getattr(st, "_flex_", None)
        if flex is not None:
            fields.append(flex[0])
        missing += [f"{name}.{f}" for f in fields
                    if f"struct.{name}.offsetof.{f}" not in seen]
    assert not missing, f"no real header set checks: {missing} (add them to native/abi_probe.c)"


def test_every_constant_is_checked_against_some_header(all_probes: list[Probed]) -> None:
    seen: set[str] = set().union(*(p.data.keys() for p in all_probes))
    missing = [name for name in expected.abi_constants()
               if expected.ALIASES.get(name, f"const.{name}") not in seen]
    assert not missing, f"no real header set checks the constants {missing}"


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def test_probe_lists_every_member(all_probes: list[Probed]) -> None:
    """The probe's own offsets must tile each struct (gaps only where alignment puts
    them); otherwise abi_probe.c forgot a member and a ctypes mirror could lack it too."""
    structs = expected.abi_structs()
    problems: list[str] = []
    for p in all_probes:
        for name, st in structs.items():
            size = p.data.get(f"struct.{name}.sizeof")
            if size is None:
                continue
            prefix = f"struct.{name}.offsetof."
            listed = sorted((int(v), k.removeprefix(prefix)) for k, v in p.data.items()
                            if k.startswith(prefix))
            types = dict((f[0], f[1]) for f in st._fields_)
            flex = getattr(st, "_flex_", None)
            if flex is not None:
                types[flex[0]] = flex[1]
            end = 0
            for off, field in listed:
                if field not in types:
                    problems.append(f"{p.name}: {name}.{field} has no ctypes field")
                    break
                if off != _align_up(end, ctypes.alignment(types[field])):
                    problems.append(f"{p.name}: {name}: unexplained gap {end}..{off} "
                                    f"before {field}")
                if flex is None or field != flex[0]:
                    end = off + int(p.data[f"struct.{name}.sizeof.{field}"])
            if _align_up(end, ctypes.alignment(st)) != size:
                problems.append(f"{p.name}: {name}: members end at {end}, sizeof is {size}")
    assert not problems, "\n".join(problems)


def test_judge_reports_a_mismatch_with_both_values() -> None:
    # The comparison must be able to fail, and say where.
    entry = expected.Entry("struct.vfio_region_info.offsetof.size", "vfio_region_info.size",
                           16, None, "vfiod.abi.vfio")
    msg = expected.judge(entry, {entry.key: 20}, "fake-6.1", (6, 1))
    assert msg is not None
    assert "vfio_region_info.size" in msg and "0x10" in msg and "0x14" in msg
    missing = expected.judge(entry, {}, "fake-6.1", (6, 1))
    assert missing is not None and "no such entry" in missing
    newer = expected.Entry("const.X", "X", 1, (6, 6), "m")
    assert expected.judge(newer, {}, "fake-6.1", (6, 1)) is None
    early = expected.judge(newer, {"const.X": 1}, "fake-6.1", (6, 1))
    assert early is not None and "SINCE" in early
