"""``LinuxKernel.read_debugfs``/``list_debugfs`` and the reader's reasons against this
machine's real debugfs (docs/kernel-contract.md §12), in a private mount namespace
(tests/support/debugfs_ns.py): what an operator would see, and that CAP_DAC_READ_SEARCH
is all a non-root vfiod needs to read it (systemd/vfiod-observe.conf)."""

from __future__ import annotations

from tests.support.debugfs_ns import observe_in_namespace

#: a PCI address no host has: its directory is never there
DEVICE = "0000:ff:1f.7"


def test_mounted_debugfs_root_only_unless_dac_read_search() -> None:
    seen = observe_in_namespace(DEVICE, mounted=True)
    # a kernel without CONFIG_VFIO_DEBUGFS (or vfio) has no vfio/; one with it lacks DEVICE
    expected = "no-device" if seen["vfio_dir"] else "no-vfio-debugfs"
    assert seen["root"]["problem"] == expected, seen
    assert seen["nobody"]["problem"] == "denied", seen         # mode 0700, owner root
    assert "EACCES" in seen["nobody"]["reason"]
    assert seen["nobody_dac_read_search"] == seen["root"], seen


def test_unmounted_debugfs_is_named() -> None:
    seen = observe_in_namespace(DEVICE, mounted=False)
    assert seen["root"]["problem"] == "no-debugfs", seen
    assert "not mounted" in seen["root"]["reason"]
