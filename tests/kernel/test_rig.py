"""The real-kernel tier's own machinery, checked on the host without booting anything:
the cpio writer, modprobe output parsing, package naming, junit → verdict mapping, the
guest command, and the QEMU watchdog (with stand-in "qemu" processes that hang or die)."""

from __future__ import annotations

import lzma
import stat
import textwrap
from pathlib import Path

import pytest

from tests.kernel import assets, results, vm
from tests.kernel.assets import AssetError, GuestAssets, Packages, parse_show_depends
from tests.kernel.initramfs import CpioWriter, build_initramfs, module_name, read_cpio

# -- initramfs -------------------------------------------------------------------------


def test_cpio_round_trip_keeps_every_kind_of_entry() -> None:
    w = CpioWriter()
    w.add_dirs("lib/modules")
    w.add_file("lib/modules/a.ko", b"\x7fELF" + bytes(5), 0o644)
    w.add_symlink("lib/sh", "busybox")
    w.add_chardev("console", 5, 1)
    blob = w.to_bytes()
    assert len(blob) % 4 == 0
    got = {e.name: e for e in read_cpio(blob)}
    assert list(got) == ["lib", "lib/modules", "lib/modules/a.ko", "lib/sh", "console"]
    assert stat.S_ISDIR(got["lib"].mode)
    assert got["lib/modules/a.ko"].data == b"\x7fELF" + bytes(5)
    assert stat.S_IMODE(got["lib/modules/a.ko"].mode) == 0o644
    assert stat.S_ISLNK(got["lib/sh"].mode) and got["lib/sh"].data == b"busybox"
    assert stat.S_ISCHR(got["console"].mode) and got["console"].rdev == (5, 1)


@pytest.mark.parametrize("name, why", [
    ("", "empty"), ("../etc/passwd", "climbs out"), ("a/b", "parent directory 'a'"),
])
def test_cpio_rejects_bad_names(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        CpioWriter().add_file(name, b"")


def test_cpio_rejects_duplicates() -> None:
    w = CpioWriter()
    w.add_file("init", b"1")
    with pytest.raises(ValueError, match="added twice"):
        w.add_file("init", b"2")


def test_read_cpio_names_the_bad_offset() -> None:
    with pytest.raises(ValueError, match="bad magic at byte 0"):
        read_cpio(b"not a cpio archive at all")


def test_initramfs_decompresses_modules_and_lists_them_in_order(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"BB")
    init = tmp_path / "init.sh"
    init.write_text("#!/bin/busybox sh\n")
    xz = tmp_path / "vfio.ko.xz"
    xz.write_bytes(lzma.compress(b"vfio module", format=lzma.FORMAT_XZ))
    plain = tmp_path / "mtty.ko"
    plain.write_bytes(b"mtty module")
    entries = {e.name: e for e in read_cpio(build_initramfs(busybox, init, [xz, plain]))}
    assert entries["lib/modules/vfio.ko"].data == b"vfio module"
    assert entries["lib/modules/mtty.ko"].data == b"mtty module"
    assert entries["modules.list"].data == b"/lib/modules/vfio.ko\n/lib/modules/mtty.ko\n"
    assert stat.S_IMODE(entries["init"].mode) == 0o755
    assert entries["dev/console"].rdev == (5, 1)
    assert module_name(xz) == "vfio.ko"


# -- assets ----------------------------------------------------------------------------

def test_parse_show_depends_skips_builtins() -> None:
    text = ("builtin intel_iommu\n"
            "insmod /m/kernel/drivers/vfio/vfio.ko.xz \n"
            "insmod /m/extra/mtty.ko  foo=1\n")
    assert parse_show_depends(text) == [Path("/m/kernel/drivers/vfio/vfio.ko.xz"),
                                        Path("/m/extra/mtty.ko")]


def test_parse_show_depends_rejects_unknown_lines() -> None:
    with pytest.raises(AssetError, match="unexpected line 'rmmod x'"):
        parse_show_depends("rmmod x\n")


def test_package_names_follow_the_image() -> None:
    p = Packages.for_image("linux-image-6.12.117+deb12-amd64-unsigned", "6.12.117-1~deb12u1")
    assert (p.release, p.headers, p.common, p.kbuild) == (
        "6.12.117+deb12-amd64", "linux-headers-6.12.117+deb12-amd64",
        "linux-headers-6.12.117+deb12-common", "linux-kbuild-6.12.117+deb12")


def test_package_names_reject_a_foreign_image() -> None:
    with pytest.raises(AssetError, match="unexpected kernel image package name"):
        Packages.for_image("linux-image-6.12.117+deb12-cloud-arm64", "1")


# -- junit → verdicts --------------------------------------------------------------------

JUNIT = textwrap.dedent("""\
    <?xml version="1.0" encoding="utf-8"?>
    <testsuites><testsuite name="pytest">
      <testcase classname="tests.kernel.guest.test_a" name="test_ok" />
      <testcase classname="tests.kernel.guest.test_a" name="test_p[1]" />
      <testcase classname="tests.kernel.guest.test_a" name="test_p[2]">
        <failure message="assert 2 == 1">trace of p2</failure></testcase>
      <testcase classname="tests.kernel.guest.test_a.TestK" name="test_m">
        <skipped type="pytest.skip" message="not here" /></testcase>
      <testcase classname="" name="tests.kernel.guest.test_b">
        <error message="collection failure">ImportError: no module x</error></testcase>
    </testsuite></testsuites>
    """)


def test_guest_tests_are_listed_statically(tmp_path: Path) -> None:
    (tmp_path / "test_a.py").write_text(textwrap.dedent("""\
        def helper(): pass
        def test_ok(): pass
        class TestK:
            def test_m(self): pass
            def other(self): pass
        """))
    (tmp_path / "rig.py").write_text("def test_not_a_test_file(): pass\n")
    assert results.discover_guest_tests(tmp_path) == ["test_a.py::test_ok",
                                                      "test_a.py::TestK::test_m"]


def test_verdicts_from_junit(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    known = ["test_a.py::test_ok", "test_a.py::test_p", "test_a.py::TestK::test_m",
             "test_b.py::test_x", "test_c.py::test_lost"]
    by = results.group_by_function(results.parse_junit(path), known)
    v = {k: results.verdict(k, by[k]) for k in known}
    assert v["test_a.py::test_ok"].outcome == "passed"
    assert v["test_a.py::test_p"].outcome == "failed"
    assert "[test_p[2]] failure: assert 2 == 1" in v["test_a.py::test_p"].message
    assert "trace of p2" in v["test_a.py::test_p"].message
    assert v["test_a.py::TestK::test_m"] == results.Verdict(
        "skipped", "guest test test_a.py::TestK::test_m skipped in the guest: not here")
    assert v["test_b.py::test_x"].outcome == "failed"
    assert "ImportError: no module x" in v["test_b.py::test_x"].message
    assert v["test_c.py::test_lost"].outcome == "failed"
    assert "did not run in the guest" in v["test_c.py::test_lost"].message


def test_missing_junit_means_no_results(tmp_path: Path) -> None:
    assert results.parse_junit(tmp_path / "absent.xml") == []


# -- the guest command and the QEMU watchdog ----------------------------------------------

def test_guest_command_runs_the_versioned_venv_python() -> None:
    cmd = vm.guest_command(["tests/kernel/guest"], "/vfiod-results/junit.xml")
    exec_line = cmd.splitlines()[-1]
    assert exec_line.startswith(f"exec {vm.guest_python()} -m pytest")
    assert Path(vm.guest_python()).name.startswith("python3.")
    assert "export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1" in cmd
    assert "-p pytest_timeout" in exec_line
    assert "--junitxml=/vfiod-results/junit.xml" in exec_line
    assert exec_line.endswith(" tests/kernel/guest")


def _fake_assets(tmp_path: Path) -> GuestAssets:
    for name in ("vmlinuz", "initramfs.cpio", "mtty.ko", "vfiod_dma.ko"):
        (tmp_path / name).write_bytes(b"")
    return GuestAssets("6.12.0-test", tmp_path / "vmlinuz", tmp_path / "initramfs.cpio",
                       tmp_path / "mtty.ko", tmp_path / "vfiod_dma.ko", tmp_path)


def _fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setattr(vm, "qemu_binary", lambda: str(script))


def test_hung_guest_is_killed_with_a_clear_message(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_qemu(tmp_path, monkeypatch, "echo 'vfiod-guest: command start'\nexec sleep 600")
    with pytest.raises(vm.VmError) as ei:
        vm.run_guest(_fake_assets(tmp_path), tmp_path / "res", ["x"], timeout=1.0)
    msg = str(ei.value)
    assert "did not finish within 1 s and was killed" in msg
    assert "VFIOD_KERNEL_TIMEOUT" in msg
    assert "vfiod-guest: command start" in msg          # the console tail is shown


def test_qemu_dying_early_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_qemu(tmp_path, monkeypatch, "echo 'qemu: could not load kernel' ; exit 1")
    with pytest.raises(vm.VmError, match="QEMU exited 1 before the guest wrote its exit code"):
        vm.run_guest(_fake_assets(tmp_path), tmp_path / "res", ["x"], timeout=60.0)


def test_finished_guest_run_is_collected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = tmp_path / "res"
    # the stand-in plays init.sh: markers on the console, files on the results share
    _fake_qemu(tmp_path, monkeypatch, textwrap.dedent(f"""\
        echo 'vfiod-guest: command start (uptime 1.0)'
        grep -q 'exec ' {res}/cmd.sh || exit 3
        echo '3 passed' > {res}/output.log
        echo 'kernel says hi' > {res}/dmesg.log
        echo 'vfiod-guest: command exit 0 (uptime 2.0)'
        echo 0 > {res}/exit-code"""))
    run = vm.run_guest(_fake_assets(tmp_path), res, ["x"], timeout=60.0)
    assert (run.exit_code, run.output, run.dmesg) == (0, "3 passed\n", "kernel says hi\n")
    assert "vfiod-guest: command exit 0" in run.console
    assert run.junit == res / "junit.xml"


_PANIC = "[    1.339235] Kernel panic - not syncing: Fatal exception in interrupt"


def _counting_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   body: str) -> tuple[Path, Path]:
    """A stand-in QEMU that counts its boots (one line each in the returned file) and then
    runs ``body`` (``{res}``: the results share, ``{boots}``: the count's file)."""
    res, boots = tmp_path / "res", tmp_path / "boots"
    _fake_qemu(tmp_path, monkeypatch,
               f"echo x >> {boots}\n" + textwrap.dedent(body).format(res=res, boots=boots))
    return res, boots


def test_a_guest_kernel_panic_before_the_command_boots_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the first boot panics before init runs anything, the second runs the command
    res, boots = _counting_qemu(tmp_path, monkeypatch, f"""\
        if [ "$(wc -l < {{boots}})" -eq 1 ]; then echo '{_PANIC}'; exit 0; fi
        echo 'vfiod-guest: command start (uptime 1.0)'
        echo '1 passed' > {{res}}/output.log
        echo 'vfiod-guest: command exit 0 (uptime 2.0)'
        echo 0 > {{res}}/exit-code""")
    run = vm.run_guest(_fake_assets(tmp_path), res, ["x"], timeout=60.0)
    assert (run.exit_code, run.output) == (0, "1 passed\n")
    assert boots.read_text().count("x") == 2
    assert _PANIC in (res / "console-panic-1.log").read_text()
    assert _PANIC not in run.console


def test_a_guest_kernel_that_panics_at_every_boot_fails_after_the_last(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = tmp_path / "res"
    _fake_qemu(tmp_path, monkeypatch, f"echo '{_PANIC}'")
    with pytest.raises(vm.VmError, match=f"panicked before its command in each of "
                                         f"{vm.BOOT_ATTEMPTS} boots") as ei:
        vm.run_guest(_fake_assets(tmp_path), res, ["x"], timeout=60.0)
    assert _PANIC in str(ei.value)
    assert sorted(p.name for p in res.glob("console-panic-*.log")) == [
        f"console-panic-{n}.log" for n in range(1, vm.BOOT_ATTEMPTS + 1)]


def test_a_panic_once_the_command_ran_is_not_booted_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res, boots = _counting_qemu(tmp_path, monkeypatch, f"""\
        echo 'vfiod-guest: command start (uptime 1.0)'
        echo '{_PANIC}'""")
    with pytest.raises(vm.VmError, match="QEMU exited 0 before the guest wrote its exit code"):
        vm.run_guest(_fake_assets(tmp_path), res, ["x"], timeout=60.0)
    assert boots.read_text().count("x") == 1


@pytest.mark.parametrize("raw", ["abc", "0", "-5", "nan"])
def test_bad_timeout_setting_is_refused(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFIOD_KERNEL_TIMEOUT", raw)
    with pytest.raises(vm.VmError, match=f"VFIOD_KERNEL_TIMEOUT={raw!r} is not a positive"):
        vm.timeout_from_env()


def test_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VFIOD_KERNEL_TIMEOUT", raising=False)
    assert vm.timeout_from_env() == vm.DEFAULT_TIMEOUT
    monkeypatch.setenv("VFIOD_KERNEL_TIMEOUT", "30.5")
    assert vm.timeout_from_env() == 30.5


# -- native/vfiod_dma's build (native/vfiod_dma/README.md "Building") ------------------------

def test_native_dma_sources_list_every_file_the_build_reads() -> None:
    """A file left out of NATIVE_DMA_SOURCES would neither reach the build directory nor
    change the cache key: every C file and header there is listed, and Kbuild names
    exactly the listed C files."""
    on_disk = {p.name for p in assets.NATIVE_DMA_DIR.iterdir() if p.suffix in (".c", ".h")}
    listed = set(assets.NATIVE_DMA_SOURCES)
    assert on_disk | {"Kbuild"} == listed
    kbuild = (assets.NATIVE_DMA_DIR / "Kbuild").read_text()
    objects = {w.removesuffix(".o") + ".c" for w in kbuild.split() if w.endswith(".o")
               and w != "vfiod_dma.o"}
    assert objects == {n for n in listed if n.endswith(".c")}


def _native_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    src = tmp_path / "native"
    src.mkdir()
    for name in (*assets.NATIVE_DMA_SOURCES, "README.md"):
        (src / name).write_bytes((assets.NATIVE_DMA_DIR / name).read_bytes())
    monkeypatch.setattr(assets, "NATIVE_DMA_DIR", src)
    return src


def test_native_dma_key_follows_the_sources_only(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    src = _native_copy(tmp_path, monkeypatch)
    key = assets.native_dma_key()
    (src / "README.md").write_text("documentation does not change the module\n")
    assert assets.native_dma_key() == key
    with open(src / "dma.c", "a") as f:
        f.write("\n")
    assert assets.native_dma_key() != key


def test_native_dma_build_is_reused_and_stale_builds_go(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _native_copy(tmp_path, monkeypatch)
    base = tmp_path / "cache"
    built = base / f"vfiod_dma-{assets.native_dma_key()}" / "vfiod_dma.ko"
    built.parent.mkdir(parents=True)
    built.write_bytes(b"ko")

    def no_build(step: str, argv: list[str]) -> object:
        raise AssertionError(f"a cached module was rebuilt: {step}")
    monkeypatch.setattr(assets, "_run", no_build)
    assert assets.build_native_dma(tmp_path / "kbuild", base) == built

    # an edited source builds afresh in its own directory; the old build is removed
    with open(assets.NATIVE_DMA_DIR / "core.c", "a") as f:
        f.write("\n")
    runs: list[list[str]] = []

    def fake_make(step: str, argv: list[str]) -> object:
        runs.append(argv)
        work = Path(next(a for a in argv if a.startswith("M=")).removeprefix("M="))
        assert {p.name for p in work.iterdir()} == set(assets.NATIVE_DMA_SOURCES)
        (work / "vfiod_dma.ko").write_bytes(b"new")
        return None
    monkeypatch.setattr(assets, "_run", fake_make)
    fresh = assets.build_native_dma(tmp_path / "kbuild", base)
    assert fresh != built and fresh.read_bytes() == b"new" and len(runs) == 1
    assert not built.parent.exists()
