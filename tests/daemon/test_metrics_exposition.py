"""``/metrics`` joined from kept family texts (vfiod/daemon/metrics_exposition.py,
docs/architecture.md §6): byte for byte prometheus-client's exposition of the same
collection in every format, a change shown by the very next scrape, an unchanged family
not formatted again, and the HTTP answer's content type, gzip and fall-backs."""

from __future__ import annotations

import gzip
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families

from vfiod.daemon.config import GuestConfig, RamConfig
from vfiod.daemon.lifecycle import LifecycleState
from vfiod.daemon.metrics import MetricsServer, VfiodCollector
from vfiod.daemon.metrics_exposition import KEEP_FORMATS, FamilyTexts
from vfiod.daemon.registry import DeviceEntry, Registry

ACCEPTS = (
    "",                                                           # text 0.0.4 (curl, urllib)
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=dots",
    "application/openmetrics-text",                               # OpenMetrics, no version
    "application/openmetrics-text;version=1.0.0;escaping=underscores,text/plain;q=0.5",
)


def _fleet(guests: int = 3, devices: int = 2) -> Registry:
    reg = Registry(clock=lambda: 1000.0)
    for i in range(guests):
        name = f"g{i}"
        e = reg.add_guest(GuestConfig(name, (RamConfig("ram0", 0, 1 << 30),)))
        reg.lifecycle.move(name, LifecycleState.CLAIMED, "test")
        reg.lifecycle.move(name, LifecycleState.RUNNING, "test")
        for d in range(devices):
            dev = f"0000:3{i}:00.{d}"
            e.devices[dev] = DeviceEntry(dev, name, "default", protocol="v2", state=2,
                                         state_label="RUNNING", tracker="device-logging",
                                         migratable=True)
    done = reg.begin_migration("g0", "source", "10.0.0.2:4444")
    reg.update(done, state="active", phase="precopy", iteration=3, bandwidth_bps=1e9,
               predicted_downtime_s=0.12, will_converge=True, last_sync_s=0.002)
    reg.observe_sync(0.002)
    reg.finish(done, "completed", downtime_s=0.1, predicted_s=0.12, verified=True)
    return reg


class _Steady:
    """The collector without the process families (whose RSS moves between two calls),
    so that two expositions of one registry state can be compared byte for byte."""

    def __init__(self, collector: VfiodCollector) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Metric]:
        return (f for f in self.collector.collect()
                if not f.name.startswith("vfiod_process_"))


def _registry_of(collector: object) -> CollectorRegistry:
    cr = CollectorRegistry(auto_describe=False)
    cr.register(collector)  # type: ignore[arg-type]
    return cr


def _whole(collector: object, accept: str = "") -> bytes:
    """prometheus-client's own exposition of ``collector``, formatted whole."""
    encoder, _ = choose_encoder(accept)
    return encoder(_registry_of(collector))


def _render(texts: FamilyTexts, accept: str = "") -> bytes:
    return texts.render(*choose_encoder(accept))


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


@pytest.mark.parametrize("accept", ACCEPTS)
def test_kept_texts_are_byte_identical_to_the_whole_exposition(accept: str) -> None:
    steady = _Steady(VfiodCollector(_fleet(), backend="sim", pinned_bytes=lambda: 0))
    texts = FamilyTexts(steady)  # type: ignore[arg-type]
    first = _render(texts, accept)                      # every family formatted
    again = _render(texts, accept)                      # every family reused
    assert first == again == _whole(steady, accept)
    assert first.endswith(b"# EOF\n") == accept.startswith("application/openmetrics-text")


def test_an_unchanged_family_is_not_formatted_again() -> None:
    reg = _fleet()
    texts = FamilyTexts(_Steady(VfiodCollector(reg, backend="sim")))  # type: ignore[arg-type]
    _render(texts)
    families = texts.formatted
    assert families > 20
    _render(texts)
    assert texts.formatted == families                  # nothing changed, nothing formatted
    reg.count_request(ok=True)
    _render(texts)
    assert texts.formatted == families + 1              # vfiod_control_requests only


def test_every_change_shows_in_the_next_scrape() -> None:
    reg = _fleet()
    steady = _Steady(VfiodCollector(reg, backend="sim"))
    texts = FamilyTexts(steady)  # type: ignore[arg-type]
    for accept in ACCEPTS:
        _render(texts, accept)

    def check(sample: str, value: float, **labels: str) -> None:
        for accept in ACCEPTS:
            assert _render(texts, accept) == _whole(steady, accept)
        got = _samples(_render(texts))
        assert got[(sample, tuple(sorted(labels.items())))] == value

    check("vfiod_device_migration_state", 2, guest="g1", device="0000:31:00.1",
          protocol="v2")
    reg.guests["g1"].devices["0000:31:00.1"].state = 3            # a driver's new state
    check("vfiod_device_migration_state", 3, guest="g1", device="0000:31:00.1",
          protocol="v2")
    reg.guests["g2"].devices["0000:32:00.0"].pre_copy_dirty_page_tracking = False
    check("vfiod_device_pre_copy_dirty_tracking_enabled", 0, guest="g2",
          device="0000:32:00.0")
    reg.lifecycle.move("g2", LifecycleState.FAILED, "test")
    check("vfiod_guest_running", 0, guest="g2")
    rec = reg.begin_migration("g1", "source", "10.0.0.3:4444")
    check("vfiod_migration_active", 1, guest="g1")
    reg.update(rec, state="active", phase="precopy", iteration=1, ram_remaining_bytes=4096)
    check("vfiod_migration_ram_remaining_bytes", 4096, guest="g1")
    reg.update(rec, iteration=2, ram_remaining_bytes=0)                     # in place
    check("vfiod_migration_iterations", 2, guest="g1")
    check("vfiod_migration_ram_remaining_bytes", 0, guest="g1")
    reg.finish(rec, "failed", error="link down")
    check("vfiod_migrations_total", 1, guest="g1", result="failed")
    check("vfiod_migration_active", 0, guest="g1")


def test_the_latest_formats_asked_for_are_kept() -> None:
    steady = _Steady(VfiodCollector(_fleet(), backend="sim"))
    texts = FamilyTexts(steady)  # type: ignore[arg-type]
    versions = [f"application/openmetrics-text;version=1.0.{i}" for i in range(KEEP_FORMATS + 2)]
    for accept in versions:
        assert _render(texts, accept) == _whole(steady, accept)
    assert len(texts._formats) == KEEP_FORMATS
    formatted = texts.formatted
    assert _render(texts, versions[-1]) == _whole(steady, versions[-1])
    assert texts.formatted == formatted                 # the latest is kept
    assert _render(texts, versions[0]) == _whole(steady, versions[0])
    assert texts.formatted > formatted                  # the oldest was dropped


def _get(url: str, **headers: str) -> tuple[bytes, dict[str, str]]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        return r.read(), dict(r.headers)


def test_the_endpoint_serves_the_kept_texts_in_the_format_asked_for() -> None:
    reg = _fleet()
    collector = VfiodCollector(reg, backend="sim", pinned_bytes=lambda: 0)
    server = MetricsServer(collector, "127.0.0.1", 0)
    url = f"http://{server.address}/metrics"
    try:
        body, headers = _get(url)
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        steady = b"".join(line for line in body.splitlines(keepends=True)
                          if b"vfiod_process_" not in line)
        assert steady == _whole(_Steady(collector))
        assert server.texts.formatted > 0
        om, headers = _get(url, Accept="application/openmetrics-text;version=1.0.0")
        assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        assert om.endswith(b"# EOF\n")
        packed, headers = _get(url, **{"Accept-Encoding": "gzip"})
        assert headers["Content-Encoding"] == "gzip"
        assert b"vfiod_guest_running" in gzip.decompress(packed)
        reg.guests["g0"].devices["0000:30:00.0"].state = 1
        body, _ = _get(url)
        assert (b'vfiod_device_migration_state{device="0000:30:00.0",guest="g0",'
                b'protocol="v2"} 1.0\n') in body
        # prometheus-client's own application answers the rest
        only, _ = _get(url + "?name[]=vfiod_guest_running")
        restricted = _registry_of(_Steady(collector)).restricted_registry(
            ["vfiod_guest_running"])
        assert only == generate_latest(restricted)      # as the library itself answers
        with pytest.raises(urllib.error.HTTPError) as posted:
            urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"),
                                   timeout=30)
        assert posted.value.code == 405
        with urllib.request.urlopen(urllib.request.Request(url, method="OPTIONS"),
                                    timeout=30) as r:
            assert r.headers["Allow"] == "OPTIONS,GET"
    finally:
        server.close()
