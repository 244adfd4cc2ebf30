"""The QEMU VM tier's checks on themselves, without QEMU: the workload page scan finds
what a vCPU wrote and refuses what breaks the record (native/qemu-guest/README.md), the
snapshot check names a lost write, and the initramfs and kernel command line carry what
the guest needs (tests/support/qemu)."""

from __future__ import annotations

import stat
import struct
from pathlib import Path

import pytest

from tests.kernel.initramfs import read_cpio
from tests.support.qemu.assets import workload_initramfs_bytes
from tests.support.qemu.guest import RESERVED_GPA, kernel_command_line
from tests.support.qemu.pages import (
    PAGE,
    WORKLOAD_MAGIC,
    WorkloadScanError,
    differing_pages,
    workload_pages,
    workload_problems,
)


def ram_file(path: Path, pages: int, records: dict[int, tuple[int, int, int]]) -> Path:
    """``pages`` zero pages; ``records`` maps file page -> (index, gpa, counter)."""
    blob = bytearray(pages * PAGE)
    for at, (index, gpa, counter) in records.items():
        blob[at * PAGE: at * PAGE + 40] = WORKLOAD_MAGIC + struct.pack("<QQQ", index, gpa,
                                                                       counter)
    path.write_bytes(bytes(blob))
    return path


def test_the_scan_finds_every_record_wherever_it_lies(tmp_path: Path) -> None:
    ram = ram_file(tmp_path / "ram", 64, {40: (0, 40 * PAGE, 7), 3: (1, 3 * PAGE, 6),
                                          17: (2, 17 * PAGE, 6)})
    assert workload_pages(ram) == {0: 7, 1: 6, 2: 6}


def test_the_scan_ignores_the_magic_away_from_a_page_start(tmp_path: Path) -> None:
    ram = ram_file(tmp_path / "ram", 4, {1: (0, PAGE, 1)})
    blob = bytearray(ram.read_bytes())
    blob[2 * PAGE + 8: 2 * PAGE + 24] = WORKLOAD_MAGIC
    ram.write_bytes(bytes(blob))
    assert workload_pages(ram) == {0: 1}


@pytest.mark.parametrize("records, says", [
    ({1: (0, 2 * PAGE, 1)}, "GPA != RAM file offset"),
    ({1: (0, PAGE, 1), 2: (0, 2 * PAGE, 1)}, "found more than once"),
])
def test_the_scan_refuses_a_broken_record(tmp_path: Path,
                                          records: dict[int, tuple[int, int, int]],
                                          says: str) -> None:
    with pytest.raises(WorkloadScanError, match=says):
        workload_pages(ram_file(tmp_path / "ram", 4, records))


def test_the_scan_refuses_a_file_that_is_not_whole_pages(tmp_path: Path) -> None:
    (tmp_path / "ram").write_bytes(b"\0" * (PAGE + 8))
    with pytest.raises(WorkloadScanError, match="not a whole number of pages"):
        workload_pages(tmp_path / "ram")


def test_a_snapshot_between_sweeps_or_inside_one_is_whole() -> None:
    assert workload_problems({0: 5, 1: 5, 2: 5}, 3) == []
    assert workload_problems({0: 6, 1: 6, 2: 5}, 3) == []


@pytest.mark.parametrize("pages, says", [
    ({0: 5, 1: 6, 2: 6}, "a write to page 0 was lost"),
    ({0: 5, 2: 5}, "1 of 3 workload pages missing"),
    ({0: 7, 1: 5, 2: 5}, "more than one sweep apart"),
    ({0: 0, 1: 0, 2: 0}, "no sweep has run yet"),
    ({0: 1, 1: 1, 2: 1, 3: 1}, "unexpected workload page indexes [3]"),
])
def test_a_snapshot_that_lost_a_write_says_so(pages: dict[int, int], says: str) -> None:
    assert any(says in p for p in workload_problems(pages, 3)), workload_problems(pages, 3)


def test_the_initramfs_has_the_workload_as_init_and_a_console() -> None:
    entries = {e.name: e for e in read_cpio(workload_initramfs_bytes(b"\x7fELF..."))}
    assert entries["init"].data == b"\x7fELF..."
    assert entries["init"].mode == stat.S_IFREG | 0o755
    assert stat.S_ISCHR(entries["dev/console"].mode)
    assert entries["dev/console"].rdev == (5, 1)


def test_the_kernel_command_line_reserves_the_device_range_literally() -> None:
    line = kernel_command_line(2048)
    assert f"memmap=16M${RESERVED_GPA:#x}" in line.split()
    assert "workload_pages=2048" in line.split()


def test_two_ram_files_differ_in_the_pages_they_differ_in(tmp_path: Path) -> None:
    a = ram_file(tmp_path / "a", 8, {1: (0, PAGE, 1)})
    b = ram_file(tmp_path / "b", 8, {1: (0, PAGE, 2), 6: (1, 6 * PAGE, 1)})
    assert differing_pages(a, a) == []
    assert differing_pages(a, b) == [1, 6]
    with pytest.raises(WorkloadScanError, match="not two RAM files of one size"):
        differing_pages(a, ram_file(tmp_path / "c", 4, {}))
