"""Preflight facts and refusals (docs/architecture.md §1): each refusal, and the pass case."""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
from pathlib import Path
from typing import Any

import pytest

from vfiod.errors import KernelError, PreflightError
from vfiod.kernel.linux import LinuxKernel, memlock_from_status
from vfiod.migration.planning.hostfacts import (
    X86_64_LEVELS,
    AbiLevel,
    HostFacts,
    MemlockFacts,
    abi_level,
    cpu_facts,
    gather_host_facts,
)
from vfiod.migration.planning.preflight import GuestFacts, MigrationFacts, check, compare
from vfiod.migration.stream import DeviceInfo
from vfiod.vfio import RamRegion

BASE = "fpu vme de pse tsc msr pae mce cx8 apic sep cmov pat mmx fxsr sse sse2 ht syscall nx lm"
V2 = BASE + " pni ssse3 cx16 sse4_1 sse4_2 popcnt lahf_lm"
V3 = V2 + " avx avx2 bmi1 bmi2 f16c fma abm movbe xsave"
V4 = V3 + " avx512f avx512bw avx512cd avx512dq avx512vl"
GiB = 1 << 30


def cpuinfo(*flag_sets: str, vendor: str = "GenuineIntel") -> str:
    return "".join(f"processor\t: {i}\nvendor_id\t: {vendor}\nmodel name\t: Test CPU\n"
                   f"flags\t\t: {flags}\n\n" for i, flags in enumerate(flag_sets))


@pytest.mark.parametrize("flags, level", [
    (BASE, AbiLevel.BASELINE), (V2, AbiLevel.V2), (V3, AbiLevel.V3), (V4, AbiLevel.V4),
    (V4.replace(" popcnt", ""), AbiLevel.BASELINE),   # v4 features without a v2 one
    (V3.replace(" movbe", ""), AbiLevel.V2),
    (BASE.replace(" syscall", ""), AbiLevel.NONE),
])
def test_abi_level_from_flags(flags: str, level: AbiLevel) -> None:
    facts = cpu_facts(cpuinfo(flags))
    assert facts.abi_level == level
    assert facts.vendor == "GenuineIntel" and facts.model == "Test CPU"


def test_the_level_lists_are_qemus() -> None:
    assert [name for name, _ in X86_64_LEVELS] == ["x86-64", "x86-64-v2", "x86-64-v3",
                                                   "x86-64-v4"]
    assert X86_64_LEVELS[1][1] == {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2",
                                   "ssse3"}
    assert X86_64_LEVELS[2][1] == {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm",
                                   "movbe"}
    assert X86_64_LEVELS[3][1] == {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def test_flags_are_those_every_processor_has() -> None:
    assert cpu_facts(cpuinfo(V3, V2, V3)).abi_level == AbiLevel.V2


def test_non_x86_cpuinfo_has_no_level() -> None:
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes crc32\n"
    assert cpu_facts(arm).abi_level == AbiLevel.NONE
    assert AbiLevel.NONE.label == "not x86-64"


def test_this_machine() -> None:
    facts = gather_host_facts(LinuxKernel())
    assert facts.page_size == resource.getpagesize()
    if platform.machine() == "x86_64":
        assert facts.cpu.abi_level >= AbiLevel.BASELINE
        assert abi_level(facts.cpu.flags) == facts.cpu.abi_level


def write(tmp: Path, rel: str, text: str) -> str:
    p = tmp / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return str(p)


def test_gather_from_files(tmp_path: Path) -> None:
    ops = LinuxKernel()
    ci = write(tmp_path, "proc/cpuinfo", cpuinfo(V3 + " sev sev_es", vendor="AuthenticAMD"))
    write(tmp_path, "sys/module/kvm_amd/parameters/sev", "Y\n")
    write(tmp_path, "sys/module/kvm_amd/parameters/sev_es", "N\n")
    f = gather_host_facts(ops, cpuinfo=ci, sys_root=str(tmp_path / "sys"),
                          page_size=4096, hostname="h1")
    assert f.cpu.abi_level == AbiLevel.V3 and f.cpu.vendor == "AuthenticAMD"
    assert f.sev.cpu_sev and f.sev.cpu_sev_es and f.sev.kvm_sev is True
    assert f.sev.kvm_sev_es is False and f.sev.host_offers_sev
    # the kernel answers memlock (this process's limit here)
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    assert f.memlock.soft == (None if soft == resource.RLIM_INFINITY else soft)
    # no kvm_amd module: unknown, not an error
    g = gather_host_facts(ops, cpuinfo=ci, sys_root=str(tmp_path / "nosys"),
                          page_size=4096, hostname="h1")
    assert g.sev.kvm_sev is None and not g.sev.host_offers_sev
    with pytest.raises(KernelError, match="no CPU information"):
        gather_host_facts(ops, cpuinfo=str(tmp_path / "missing"))


def test_memlock_from_proc_status() -> None:
    m = memlock_from_status("Name:\tvfiod\nVmLck:\t    2048 kB\nCapEff:\t0000000000000000\n",
                            8 * GiB, resource.RLIM_INFINITY)
    assert m == MemlockFacts(8 * GiB, None, 2 << 20, False)
    assert m.headroom() == 8 * GiB - (2 << 20)


def test_cap_ipc_lock_lifts_the_memlock_limit() -> None:
    m = memlock_from_status("VmLck:\t0 kB\nCapEff:\t0000000000004000\n", 64 << 10, 64 << 10)
    assert m.cap_ipc_lock and m.headroom() is None


# -- compare -------------------------------------------------------------------------------

REGIONS = (RamRegion("ram0", 0, 2 * GiB), RamRegion("ram1", 4 * GiB, 2 * GiB))
DEV = DeviceInfo("0000:3b:00.1", "v2", 0b111, {"vendor": "0x15b3", "device": "0x101e",
                                                "driver": "mlx5_vfio_pci"}, ("PRE_COPY",),
                 id="nic0")


def host(name: str, flags: str = V3, memlock: MemlockFacts | None = None,
         page_size: int = 4096) -> HostFacts:
    from vfiod.migration.planning.hostfacts import SevFacts
    return HostFacts(name, cpu_facts(cpuinfo(flags)), SevFacts(False, False, None, None),
                     memlock or MemlockFacts(None, None, 0, False), page_size)


def facts(hostname: str, dev_name: str = DEV.name, **change: Any) -> MigrationFacts:
    guest = GuestFacts("vm1", 4096, REGIONS, (dataclasses.replace(DEV, name=dev_name),),
                       pinned_bytes=4 * GiB)
    host_kw = {k: change.pop(k) for k in ("flags", "memlock", "page_size") if k in change}
    guest = dataclasses.replace(guest, **change)
    return MigrationFacts(host(hostname, **host_kw), guest)


def test_pass_case_with_different_pci_addresses() -> None:
    src, dst = facts("a"), facts("b", dev_name="0000:5e:00.1")
    assert compare(src, dst) == []
    check(src, dst)  # does not raise
    # a better destination CPU is fine
    assert compare(src, facts("b", flags=V4)) == []


def test_lower_abi_level_is_refused_with_the_missing_flags() -> None:
    reasons = compare(facts("a", flags=V3), facts("b", flags=V2))
    assert len(reasons) == 1
    assert reasons[0].startswith("destination CPU b is x86-64-v2, below the source's x86-64-v3")
    assert "abm avx avx2 bmi1 bmi2 f16c fma movbe" in reasons[0]


@pytest.mark.parametrize("enc, name", [("sev", "AMD SEV"), ("sev-es", "AMD SEV-ES")])
def test_encrypted_guests_are_refused(enc: str, name: str) -> None:
    reasons = compare(facts("a", memory_encryption=enc), facts("b"))
    assert reasons == [f"guest vm1 uses {name} memory encryption (source configuration): its "
                       "RAM is ciphertext to the host, so it cannot be migrated by copying pages"]


def test_memlock_headroom_is_checked_on_the_destination() -> None:
    tight = MemlockFacts(soft=2 * GiB, hard=2 * GiB, locked=0, cap_ipc_lock=False)
    reasons = compare(facts("a"), facts("b", memlock=tight))
    assert len(reasons) == 1 and "LimitMEMLOCK=infinity" in reasons[0]
    assert "can lock 2.00 GiB more" in reasons[0] and "needs 4.00 GiB" in reasons[0]
    # enough room, or CAP_IPC_LOCK, or unlimited: fine
    roomy = MemlockFacts(8 * GiB, 8 * GiB, 1 * GiB, False)
    assert compare(facts("a"), facts("b", memlock=roomy)) == []
    capped = MemlockFacts(64 << 10, 64 << 10, 0, True)
    assert compare(facts("a"), facts("b", memlock=capped)) == []
    # locked memory eats into the headroom
    used = MemlockFacts(8 * GiB, 8 * GiB, 5 * GiB, False)
    assert "can lock 3.00 GiB more" in compare(facts("a"), facts("b", memlock=used))[0]


def test_page_size_differences() -> None:
    reasons = compare(facts("a"), facts("b", page_size=65536))
    assert reasons == ["host page size differs: source 4096, destination 65536"]
    reasons = compare(facts("a"), dataclasses.replace(
        facts("b"), guest=dataclasses.replace(facts("b").guest, page_size=2 << 20)))
    assert reasons == ["guest page size differs: source 4096, destination 2097152"]


def test_memory_layout_difference() -> None:
    other = (RamRegion("ram0", 0, 2 * GiB), RamRegion("ram1", 4 * GiB, 1 * GiB))
    reasons = compare(facts("a"), facts("b", regions=other))
    assert reasons == ["guest memory layout differs: only on the source ['0x100000000+0x80000000'"
                       "], only on the destination ['0x100000000+0x40000000']"]


def test_device_identity_and_flags_must_match() -> None:
    other = dataclasses.replace(DEV, name="0000:5e:00.1",
                                identity={**DEV.identity, "device": "0x1021"}, flags=0b011)
    reasons = compare(facts("a"), facts("b", devices=(other,)))
    assert reasons == [
        "device nic0 (source 0000:3b:00.1, destination 0000:5e:00.1): identity differs: "
        "device 0x101e vs 0x1021",
        "device nic0 (source 0000:3b:00.1, destination 0000:5e:00.1): migration flags 0x7 "
        "vs 0x3"]
    v1 = dataclasses.replace(DEV, protocol="v1")
    assert "migration protocol v2 vs v1" in compare(facts("a"), facts("b", devices=(v1,)))[0]
    reasons = compare(facts("a"), facts("b", devices=()))
    assert reasons == ["device nic0 (source 0000:3b:00.1) is not on the destination"]


def _dev(name: str, dev_id: str = "", **change: Any) -> DeviceInfo:
    return dataclasses.replace(DEV, name=name, id=dev_id or name, **change)


def test_devices_pair_by_id_whatever_the_order() -> None:
    """PCI addresses and the order of the lists differ between the hosts: pairs by id."""
    gpu = dict(identity={"vendor": "0x10de", "device": "0x1eb8"}, protocol="v1", flags=0)
    src = (_dev("0000:3b:00.1", "nic0"), _dev("0000:3c:00.0", "gpu0", **gpu))
    dst = (_dev("0000:82:00.0", "gpu0", **gpu), _dev("0000:81:00.1", "nic0"))
    assert compare(facts("a", devices=src), facts("b", devices=dst)) == []
    # by position the NIC would meet the GPU: refused, naming the pair by id
    swapped = (_dev("0000:82:00.0", "nic0", **gpu), _dev("0000:81:00.1", "gpu0"))
    reasons = compare(facts("a", devices=src), facts("b", devices=swapped))
    assert reasons[0].startswith("device nic0 (source 0000:3b:00.1, destination "
                                 "0000:82:00.0): identity differs: device 0x101e vs 0x1eb8")
    assert "device nic0 (source 0000:3b:00.1, destination 0000:82:00.0): migration protocol "\
           "v2 vs v1" in reasons


def test_a_pair_of_another_subsystem_is_refused() -> None:
    """Same chip, another board (PCI subsystem ids): the pair's identity differs."""
    ident = {**DEV.identity, "subsystem_vendor": "0x15b3", "subsystem_device": "0x0047"}
    other = {**ident, "subsystem_device": "0x0051"}
    reasons = compare(facts("a", devices=(_dev("0000:3b:00.1", "nic0", identity=ident),)),
                      facts("b", devices=(_dev("0000:81:00.1", "nic0", identity=other),)))
    assert reasons == ["device nic0 (source 0000:3b:00.1, destination 0000:81:00.1): "
                       "identity differs: subsystem_device 0x0047 vs 0x0051"]


def test_missing_extra_and_duplicate_ids_are_refused_by_name() -> None:
    src = (_dev("0000:3b:00.1", "nic0"), _dev("0000:3b:00.2", "nic1"))
    dst = (_dev("0000:81:00.1", "nic0"), _dev("0000:81:00.3", "nic9"))
    assert compare(facts("a", devices=src), facts("b", devices=dst)) == [
        "device nic1 (source 0000:3b:00.2) is not on the destination",
        "device nic9 (destination 0000:81:00.3) is not on the source"]
    twice = (_dev("0000:81:00.1", "nic0"), _dev("0000:81:00.2", "nic0"),
             _dev("0000:81:00.3", "nic1"))
    assert compare(facts("a", devices=src), facts("b", devices=twice)) == [
        "the destination lists device id nic0 twice (0000:81:00.1 and 0000:81:00.2): ids "
        "must be unique within a guest"]
    assert compare(facts("a", devices=twice), facts("b", devices=src)) == [
        "the source lists device id nic0 twice (0000:81:00.1 and 0000:81:00.2): ids must "
        "be unique within a guest"]


def test_a_device_without_id_pairs_by_name_and_a_mismatch_says_so() -> None:
    """No id configured: the id is the name, so other addresses never pair silently."""
    same = compare(facts("a", devices=(_dev("0000:3b:00.1"),)),
                   facts("b", devices=(_dev("0000:3b:00.1"),)))
    assert same == []
    reasons = compare(facts("a", devices=(_dev("0000:3b:00.1"),)),
                      facts("b", devices=(_dev("0000:81:00.1"),)))
    advice = ("no id is configured for it, so it pairs only with a device of the same name "
              "(PCI addresses differ between hosts): give it the same id in both hosts' "
              "configurations")
    assert reasons == [
        f"device 0000:3b:00.1 (source 0000:3b:00.1) is not on the destination: {advice}",
        f"device 0000:81:00.1 (destination 0000:81:00.1) is not on the source: {advice}"]
    # an id on one side only: the side with the id gets no advice, the other does
    reasons = compare(facts("a", devices=(_dev("0000:3b:00.1", "nic0"),)),
                      facts("b", devices=(_dev("0000:81:00.1"),)))
    assert reasons[0] == "device nic0 (source 0000:3b:00.1) is not on the destination"
    assert reasons[1].endswith(advice)


def test_protocol_version_and_every_reason_reported_together() -> None:
    src = facts("a", flags=V4, memory_encryption="sev")
    dst = dataclasses.replace(facts("b", flags=V2, devices=()), protocol_version=2)
    reasons = compare(src, dst)
    assert reasons[0] == "stream protocol differs: source speaks 4, destination 2"
    assert len(reasons) == 4
    with pytest.raises(PreflightError) as ei:
        check(src, dst)
    assert ei.value.reasons == reasons


def test_facts_travel_as_json() -> None:
    src = facts("a", memlock=MemlockFacts(8 * GiB, None, 0, True))
    back = MigrationFacts.from_json(src.to_json())
    assert back == src
    assert [d.id for d in back.guest.devices] == ["nic0"]
    # an older peer's facts have no ids: its devices pair by name, and the protocol
    # versions differ, which is the refusal it gets
    old = json.loads(src.to_json())
    del old["guest"]["devices"][0]["id"]
    old["protocol_version"] = 2
    older = MigrationFacts.from_json(json.dumps(old))
    assert older.guest.devices[0].id == DEV.name
    assert compare(facts("a"), older)[0].startswith("stream protocol differs")
    with pytest.raises(ValueError, match="malformed"):
        MigrationFacts.from_json('{"host": {}}')
    with pytest.raises(ValueError, match="malformed"):
        MigrationFacts.from_json("not json")
