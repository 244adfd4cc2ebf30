"""Preflight refusals (docs/architecture.md §1 step 5): migration flags, x86-64 ABI level, memory
encryption, memory layout, an unpaired device, protocol version. Every reason is reported at once, nothing is
touched on either side (no device state change, no dirty tracking, no byte of guest RAM
written on the destination), and the destination also refuses a header that does not
match its guest before writing any RAM, whatever the source says."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.session_rig import (
    MiB,
    Side,
    SideContainer,
    build_side,
    migrate,
    spec,
)
from vfiod.abi.vfio import VFIO_MIGRATION_STOP_COPY
from vfiod.migration.planning.hostfacts import AbiLevel
from vfiod.migration.planning.preflight import MigrationFacts
from vfiod.migration.session.common import SessionConfig, guest_facts
from vfiod.migration.session.dest import DestinationSession
from vfiod.migration.session.source import SourceSession
from vfiod.migration.states import MigState
from vfiod.migration.stream import GuestRam, StreamHeader, StreamWriter
from vfiod.migration.stream.records import PREAMBLE_SIZE, pack_preamble
from vfiod.migration.transport import (
    AckStage,
    Connection,
    ControlMessage,
    Listener,
    TransportCode,
    TransportError,
    connect,
)
from vfiod.vfio import RamRegion

DEV = spec("v2_precopy_log")


def build(tmp: Path, dst_dev: Any = None, dst_ram: int = 8 * MiB,
          dst_abi: AbiLevel = AbiLevel.V3, extra_dst: list[Any] | None = None
          ) -> tuple[Side, Side]:
    src = build_side(tmp / "src", "hostA", [SideContainer([DEV])], fill_bytes=1 * MiB)
    d = dst_dev or dataclasses.replace(DEV, name="0000:8e:00.1", seed=77)
    dst = build_side(tmp / "dst", "hostB", [SideContainer([d] + (extra_dst or []))],
                     ram=(RamRegion("ram", 0, dst_ram),), abi=dst_abi)
    return src, dst


def untouched(src: Side, dst: Side, run: Any, src_ram: Any, dst_ram: Any) -> None:
    """Nothing changed anywhere: no state write on any device, no tracking, no RAM."""
    for side in (src, dst):
        log = side.kernel.faults.log
        assert not [e for e in log if e.startswith("transition:")]
        assert not [e for e in log if e.startswith("feature:DMA_LOGGING_START")]
        assert set(side.kernel_states().values()) == {MigState.RUNNING}
        assert side.mig_fds() == []
    assert run.session.tracker is None
    assert src.ram_digest() == src_ram and dst.ram_digest() == dst_ram
    assert dst.models() == dst.initial_models


@pytest.fixture
def made():
    sides: list[Side] = []
    yield sides
    for s in sides:
        s.close()


def refuse(src: Side, dst: Side, **kw: Any) -> Any:
    src_ram, dst_ram = src.ram_digest(), dst.ram_digest()
    run = migrate(src, dst, SessionConfig(ack_timeout_s=20), **kw)
    r = run.source
    assert r.result == "failed" and r.reason.startswith("preflight refused:")
    assert run.dest is not None and run.dest.result in ("failed", "cancelled")
    untouched(src, dst, run, src_ram, dst_ram)
    return r.verification["preflight"]


def test_migration_flags_differ(tmp_path: Path, made: list[Side]) -> None:
    src, dst = build(tmp_path, dataclasses.replace(DEV, name="0000:8e:00.1",
                                                   mig_flags=VFIO_MIGRATION_STOP_COPY))
    made += [src, dst]
    reasons = refuse(src, dst)
    assert any("migration flags 0x5 vs 0x1" in r for r in reasons), reasons


def test_destination_cpu_abi_level_below_the_source(tmp_path: Path, made: list[Side]) -> None:
    src, dst = build(tmp_path, dst_abi=AbiLevel.V2)
    made += [src, dst]
    reasons = refuse(src, dst)
    assert len(reasons) == 1 and "x86-64-v2, below the source's x86-64-v3" in reasons[0]
    assert "avx2" in reasons[0]


@pytest.mark.parametrize("where", ["source", "destination"])
def test_encrypted_guest_is_refused(tmp_path: Path, made: list[Side], where: str) -> None:
    src, dst = build(tmp_path)
    made += [src, dst]
    kw = {"src_encryption": "sev-es"} if where == "source" else {"dst_encryption": "sev"}
    reasons = refuse(src, dst, **kw)
    assert any("memory encryption" in r and "ciphertext" in r for r in reasons), reasons


def test_every_reason_at_once(tmp_path: Path, made: list[Side]) -> None:
    src, dst = build(tmp_path, dst_ram=16 * MiB, dst_abi=AbiLevel.V2,
                     extra_dst=[spec("v2_stop_copy_log", name="0000:8c:00.1")])
    made += [src, dst]
    reasons = refuse(src, dst, src_encryption="tdx")
    text = " | ".join(reasons)
    for needle in ("Intel TDX", "below the source's", "memory layout differs",
                   "device dev1 (destination 0000:8c:00.1) is not on the source"):
        assert needle in text, text


@contextmanager
def _past_hello(dst: Side) -> Iterator[tuple[Connection, dict[str, Any]]]:
    """A connection to a destination session on loopback, past its HELLO; when the block
    ends the session's thread is joined and box["r"] holds its result."""
    box: dict[str, Any] = {}

    def serve() -> None:
        with lst.accept(timeout=30) as conn:
            box["r"] = DestinationSession(dst.guest, conn, host=dst.facts,
                                          config=SessionConfig(ack_timeout_s=5)).run()
    with Listener("127.0.0.1", 0) as lst:
        t = threading.Thread(target=serve)
        t.start()
        with connect("127.0.0.1", lst.address[1]) as conn:
            box["challenge"] = conn.wait_ack(AckStage.HELLO, 10).fields["challenge"]
            yield conn, box
        t.join(30)


def test_destination_refuses_a_header_that_does_not_match(tmp_path: Path,
                                                          made: list[Side]) -> None:
    """A source that ignores preflight and sends RAM for another layout: the destination
    answers ERROR after the HEADER and writes nothing into its guest."""
    _, dst = build(tmp_path)
    made.append(dst)
    before = dst.ram_digest()
    with _past_hello(dst) as (conn, box):
        region = RamRegion("ram", 0, 16 * MiB)              # not the destination's 8 MiB
        mem = bytearray(b"\xab" * (16 * MiB))
        w = StreamWriter(conn, StreamHeader("rogue", "m1", "vm1", 4096, (region,), (),
                                                challenge=box["challenge"]),
                         GuestRam(4096, (region,), [mem]))
        with pytest.raises(Exception, match="preflight refused"):
            w.start()                           # the ERROR may already be there
            w.send_ram([(0, 64)], quiescent=True)
            conn.wait_ack(AckStage.HEADER, 10)
    r = box["r"]
    assert r.result == "failed" and "memory layout differs" in r.reason
    assert dst.ram_digest() == before
    assert dst.mig_fds() == [] and dst.models() == dst.initial_models


def test_source_refuses_a_destination_of_the_older_protocol(tmp_path: Path,
                                                            made: list[Side]) -> None:
    """A version-3 destination (it would resume without waiting for COMMIT) says so in
    its hello facts: the source refuses before tracking anything, names both versions, and
    its HEADER (version 4) tells the old destination the same by number."""
    src, dst = build(tmp_path)
    made += [src, dst]
    before = src.ram_digest()
    old = dataclasses.replace(MigrationFacts(dst.facts, guest_facts(dst.guest)),
                              protocol_version=3)
    got = bytearray()
    with Listener("127.0.0.1", 0) as lst:
        def old_destination() -> None:
            with lst.accept(timeout=30) as conn:
                conn.send_control(ControlMessage.ack(AckStage.HELLO, facts=old.to_json(),
                                                     challenge="c"))
                buf = memoryview(bytearray(1 << 16))
                while n := conn.recv_into(buf):
                    got.extend(buf[:n])
        t = threading.Thread(target=old_destination)
        t.start()
        with connect("127.0.0.1", lst.address[1]) as conn:
            session = SourceSession(src.guest, conn, host=src.facts,
                                    config=SessionConfig(ack_timeout_s=10))
            r = session.run()
        t.join(30)
    assert r.result == "failed" and r.reason.startswith("preflight refused:")
    assert r.verification["preflight"] == [
        "stream protocol differs: source speaks 4, destination 3"]
    assert bytes(got[:PREAMBLE_SIZE]) == pack_preamble(4)
    assert session.tracker is None and src.ram_digest() == before
    assert set(src.kernel_states().values()) == {MigState.RUNNING}


def test_destination_refuses_a_source_of_the_older_protocol(tmp_path: Path,
                                                            made: list[Side]) -> None:
    """A version-3 source's stream (it sends no COMMIT) is refused at its preamble, by
    number, before the destination writes anything; the source hears why (ERROR)."""
    _, dst = build(tmp_path)
    made.append(dst)
    before = dst.ram_digest()
    with _past_hello(dst) as (conn, box):
        conn.send_buffers([pack_preamble(3)])
        with pytest.raises(TransportError) as ei:
            conn.wait_ack(AckStage.HEADER, 10)
    said = "stream protocol version 3 (an older vfiod), this vfiod speaks 4 only"
    assert ei.value.code is TransportCode.PEER_ERROR and ei.value.remote["code"] == "VERSION"
    assert said in ei.value.remote["message"]
    r = box["r"]
    assert r.result == "failed" and said in r.reason
    assert dst.ram_digest() == before and dst.mig_fds() == []
