"""Header sets for the ABI tier, each probed once per session (docs/testing.md, abi tier).

No skips: a missing gcc, a failed download or a compile error fails the tests that need
the probe, with the reason.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.abi.probe import HeaderSet, ProbeError, system_headers, uapi_headers
from tests.support import debian

#: The newer uAPI headers come from Debian's linux-headers-6.12.*-common package.
UAPI_PACKAGE = r"linux-headers-6\.12\.[0-9.]+\+deb12-common"

HEADER_SET_IDS = ["system", "uapi-6.12"]


class Probed:
    def __init__(self, headers: HeaderSet, data: dict[str, Any]) -> None:
        self.headers = headers
        self.data = data

    @property
    def name(self) -> str:
        return self.headers.name

    @property
    def version(self) -> tuple[int, int]:
        return self.headers.version


def _header_set(which: str, tmp_factory: pytest.TempPathFactory) -> HeaderSet:
    if which == "system":
        return system_headers()
    try:
        root = debian.fetch(debian.newest_package(UAPI_PACKAGE))
    except (debian.DebianFetchError, OSError) as exc:
        raise ProbeError(f"could not fetch the 6.12 uAPI headers ({UAPI_PACKAGE}): {exc}") \
            from exc
    return uapi_headers(root, tmp_factory.mktemp("uapi-6.12-include"))


_cache: dict[str, Probed | str] = {}


def probed(which: str, tmp_factory: pytest.TempPathFactory) -> Probed:
    """The probe output for one header set; the first failure is remembered so every
    dependent test fails fast with the same message instead of retrying the build."""
    if which not in _cache:
        try:
            hs = _header_set(which, tmp_factory)
            _cache[which] = Probed(hs, hs.probe())
        except ProbeError as exc:
            _cache[which] = str(exc)
    got = _cache[which]
    if isinstance(got, str):
        pytest.fail(f"ABI probe for header set {which!r} unavailable: {got}", pytrace=False)
    return got


@pytest.fixture(scope="session", params=HEADER_SET_IDS)
def header_probe(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Probed:
    return probed(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def all_probes(tmp_path_factory: pytest.TempPathFactory) -> list[Probed]:
    return [probed(which, tmp_path_factory) for which in HEADER_SET_IDS]
