"""vfiod.abi against the uAPI headers of the very kernel the guest boots (docs/testing.md
"Checking ctypes layouts against the 6.12 uAPI headers"; docs/kernel-contract.md §0-§7).

The ABI tier checks the newest 6.12 headers; this check pins the headers to the kernel
build the real-kernel tier runs (the image's own ``linux-headers-<abi>-common``), so what
the guest tests exercise is exactly the layout the probe compiled. Runs on the host:
compiling inside the guest would cost minutes under emulation for the same answer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.abi import expected
from tests.abi.probe import uapi_headers
from tests.kernel import assets
from tests.kernel.vm import why_not_runnable
from tests.support import debian


def test_vfiod_abi_matches_guest_kernel_uapi_headers(tmp_path: Path) -> None:
    why = why_not_runnable()
    if why:
        pytest.skip(why)
    pkgs = assets.resolve_packages()
    headers = uapi_headers(debian.fetch(pkgs.common), tmp_path / "include")
    assert headers.version == tuple(int(x) for x in debian.KERNEL_SERIES.split("."))
    data = headers.probe()
    problems = [p for e in expected.entries()
                if (p := expected.judge(e, data, f"{pkgs.common}", headers.version))]
    assert not problems, "\n".join(problems)
