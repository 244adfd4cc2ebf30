"""The simulated device model and its stream sessions, without a kernel around them."""

from __future__ import annotations

import dataclasses

import pytest

from vfiod.kernel.sim.interfaces import DeviceSpec
from vfiod.kernel.sim.migration.device_model import CHUNK, DeviceModel
from vfiod.kernel.sim.migration.stream import LoadSession, SaveSession, full_stream_length

SPEC = DeviceSpec(name="0000:01:00.0", state_size=3 * CHUNK + 100, dirty_rate=300, seed=7,
                  precopy_size=0)


def test_deterministic_from_seed_and_only_changes_while_running() -> None:
    a, b = DeviceModel(SPEC), DeviceModel(SPEC)
    assert a == b
    assert DeviceModel(dataclasses.replace(SPEC, seed=8)) != a
    assert a.tick(3) == 3 * 300
    assert a != b
    b.tick(3)
    assert a == b
    a.running = False
    before = a.digest()
    assert a.tick(10) == 0 and a.digest() == before and a.ticks == 3


def test_tick_rewrites_dirty_rate_bytes_and_reports_chunks() -> None:
    m = DeviceModel(dataclasses.replace(SPEC, dirty_rate=SPEC.state_size))   # wraps around
    obs = m.observe()
    old = bytes(m.state)
    m.tick(1)
    changed = sum(x != y for x, y in zip(old, m.state, strict=True))
    assert changed > SPEC.state_size * 0.9          # random bytes: almost all differ
    assert obs == set(range(m.nchunks))
    m.unobserve(obs)
    obs.clear()
    m.tick(1)
    assert obs == set()


def test_save_restore_and_bad_snapshots() -> None:
    a, b = DeviceModel(SPEC), DeviceModel(dataclasses.replace(SPEC, seed=99))
    a.tick(2)
    with pytest.raises(RuntimeError, match="while the device is running"):
        a.save()
    a.running = False
    blob = a.save()
    b.restore(blob)
    assert a == b
    with pytest.raises(ValueError, match="shorter than"):
        b.restore(blob[:5])
    small = DeviceModel(dataclasses.replace(SPEC, state_size=100))
    with pytest.raises(ValueError, match="this device has 100"):
        small.restore(blob)


def test_power_on_restores_the_seeded_state() -> None:
    a = DeviceModel(SPEC)
    fresh = a.digest()
    a.tick(4)
    a.running = False
    a.power_on()
    assert a.digest() == fresh and a.running and a.ticks == 0


def test_sessions_roundtrip_any_segmentation() -> None:
    src, dst = DeviceModel(SPEC), DeviceModel(dataclasses.replace(SPEC, seed=3))
    s = SaveSession(src, precopy=True, precopy_size=50_000)
    assert s.initial_left == 50_000
    out = bytearray(s.read(1 << 20))
    assert len(out) == 50_000 and s.read(10) == b""
    src.tick(2)
    assert s.dirty_bytes > 0
    out += s.read(1 << 20)
    src.running = False
    predicted = s.stop_copy_length()
    s.enter_stop_copy()
    tail = s.read(1 << 20)
    assert len(tail) == predicted and s.read(1) == b""
    out += tail
    load = LoadSession(dst, "dst")
    for i in range(0, len(out), 999):
        load.write(bytes(out[i:i + 999]))
    load.finish()
    assert dst == src


def test_full_stream_length_matches_a_stop_copy_session() -> None:
    m = DeviceModel(SPEC)
    m.running = False
    s = SaveSession(m, precopy=False)
    assert len(s.read(1 << 20)) == full_stream_length(m)
