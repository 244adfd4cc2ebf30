"""The configuration file (docs/architecture.md §6): a good file becomes frozen dataclasses; every bad
one is refused naming file, line and key, and nothing half-applies."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from tests.support.daemon_configs import UNOWNED, host_config
from vfiod.daemon.config import Address, Config, load_config, parse_config
from vfiod.daemon.config_toml import KeyLines, parse_size
from vfiod.errors import ConfigError

GOOD = """\
[control]
socket = "/run/vfiod/control.sock"
group = "vfiod"

[metrics]
listen = "[::1]:9477"

[migration]
listen = "0.0.0.0:4444"
downtime_limit_ms = 150
timeout_s = 600
on_timeout = "force"
bandwidth_limit = "1GiB"
ack_timeout_s = 5
io_timeout_s = 7.5
channels = 3
[migration.tls]
cert = "/etc/vfiod/host.pem"
key = "/etc/vfiod/host.key"
ca = "/etc/vfiod/ca.pem"

[paths]
state = "/srv/vfiod/state"

[[guest]]
name = "g1"
memory = "4GiB"
[[guest.device]]
name = "0000:3b:00.1"
id = "nic0"
[[guest.device]]
name = "6c4e8e12-0b1a-4d1e-9d4f-2b7a3c5e0a11"
container = "c1"
pre_copy_dirty_page_tracking = false

[[guest]]
name = "g2"
page_size = 2097152
start = "incoming"
[[guest.ram]]
name = "low"
size = "2GiB"
path = "/dev/hugepages/g2-low"
[[guest.ram]]
name = "high"
gpa = "4GiB"
size = "2GiB"
"""


def test_good_file(tmp_path: Path) -> None:
    f = tmp_path / "vfiod.toml"
    f.write_text(GOOD)
    cfg = load_config(str(f))
    assert cfg.source == str(f)
    assert cfg.metrics.listen == Address("::1", 9477) and str(cfg.metrics.listen) == "[::1]:9477"
    m = cfg.migration
    assert (m.listen, m.downtime_limit_ms, m.timeout_s, m.on_timeout, m.bandwidth_limit) == (
        Address("0.0.0.0", 4444), 150.0, 600.0, "force", 1 << 30)
    assert (m.ack_timeout_s, m.io_timeout_s, m.channels) == (5.0, 7.5, 3)
    assert m.tls is not None and m.tls.cafile == "/etc/vfiod/ca.pem"
    assert (cfg.paths.state, cfg.paths.sysfs) == ("/srv/vfiod/state", "/sys")
    g1, g2 = cfg.guests
    assert g1.ram_bytes == 4 << 30 and g1.ram[0].name == "ram0"
    assert [(d.name, d.id, d.container, d.pre_copy_dirty_page_tracking)
            for d in g1.devices] == [
        ("0000:3b:00.1", "nic0", "default", True),
        # no id: the id is the name (migrations then pair it only with that name)
        ("6c4e8e12-0b1a-4d1e-9d4f-2b7a3c5e0a11", "6c4e8e12-0b1a-4d1e-9d4f-2b7a3c5e0a11",
         "c1", False)]
    assert g2.start == "incoming" and g2.page_size == 2 << 20
    assert [(r.name, r.gpa, r.size, r.path) for r in g2.ram] == [
        ("low", 0, 2 << 30, "/dev/hugepages/g2-low"), ("high", 4 << 30, 2 << 30, None)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.guests[0].name = "x"  # type: ignore[misc]


def test_defaults_and_test_configs_parse() -> None:
    cfg = parse_config("")
    assert cfg == Config(source="(text)")
    assert cfg.control.socket == "/run/vfiod/control.sock"
    assert str(cfg.metrics.listen) == "127.0.0.1:9477" and cfg.migration.listen is None
    assert (cfg.migration.ack_timeout_s, cfg.migration.io_timeout_s) == (60.0, 120.0)
    assert cfg.migration.channels == 1                  # RAM on the main connection
    assert cfg.paths.state == "/var/lib/vfiod"          # the unit's StateDirectory
    src = parse_config(host_config("source", guests=("g1", "g2"), extra_sim=UNOWNED,
                                   workloads={"g1": ("1MiB", "2MiB")}))
    assert [d.capability for d in src.sim.devices][-2:] == ["not_migratable", "v1"]
    assert src.guests[0].regions_of("c1") == (src.guests[0].ram[1],)
    assert src.guests[0].regions_of("c0") == src.guests[0].ram


def test_documented_example_parses() -> None:
    import textwrap

    from vfiod.daemon import config, config_sim

    def example_of(module: object) -> str:
        doc = getattr(module, "__doc__", None) or ""
        return textwrap.dedent(doc.split("\n\n", 1)[1].rsplit('"""', 1)[0])

    cfg = parse_config(example_of(config) + "\n" + example_of(config_sim), "example")
    assert (cfg.guests[0].devices[0].name, cfg.guests[0].devices[0].id) == ("0000:3b:00.1",
                                                                             "nic0")
    assert cfg.migration.tls is not None and cfg.sim.host_devices[0].driver == "mlx5_core"
    assert cfg.sim.workloads[0].fill == 64 << 20
    assert cfg.sim.memlock_limit == 8 << 30 and cfg.sim.iommu_dirty_tracking is False


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def _last_line_of(text: str, needle: str) -> int:
    return [i for i, line in enumerate(text.splitlines(), 1) if needle in line][-1]


@pytest.mark.parametrize("old, new, at, message", [
    ('listen = "0.0.0.0:4444"', 'listn = "0.0.0.0:4444"', "listn",
     "migration.listn: unknown key 'listn' (this table knows"),
    ('listen = "0.0.0.0:4444"', 'listen = "0.0.0.0"', "listen = \"0.0.0.0\"",
     "migration.listen: listen '0.0.0.0' must be HOST:PORT"),
    ("downtime_limit_ms = 150", "downtime_limit_ms = -1", "downtime_limit_ms",
     "migration.downtime_limit_ms: must be a number above 0"),
    ("downtime_limit_ms = 150", "downtime_limit_ms = nan", "downtime_limit_ms",
     "migration.downtime_limit_ms: must be a finite number, not nan"),
    ("downtime_limit_ms = 150", "downtime_limit_ms = -inf", "downtime_limit_ms",
     "migration.downtime_limit_ms: must be a finite number, not -inf"),
    ("timeout_s = 600", "timeout_s = nan", "timeout_s = nan",
     "migration.timeout_s: must be a finite number, not nan"),
    ("timeout_s = 600", "timeout_s = inf", "timeout_s = inf",
     "migration.timeout_s: must be a finite number, not inf"),
    ("ack_timeout_s = 5", "ack_timeout_s = 0", "ack_timeout_s",
     "migration.ack_timeout_s: must be a number above 0"),
    ("io_timeout_s = 7.5", 'io_timeout_s = "soon"', "io_timeout_s",
     "migration.io_timeout_s: must be a number above 0"),
    ("channels = 3", "channels = 17", "channels", "migration.channels: 17 is above the maximum 16"),
    ("channels = 3", "channels = 0", "channels", "migration.channels: 0 is below the minimum 1"),
    ('memory = "4GiB"', 'memory = "100000TiB"', 'memory = "100000TiB"',
     "guest[0].memory: guest g1 would have 109951162777600000 bytes of RAM, more than this "
     "host's"),
    ('memory = "4GiB"', 'memory = "2000000TiB"', 'memory = "2000000TiB"',
     "guest[0].memory: '2000000TiB' is 2199023255552000000 bytes, above the limit of "
     "1152921504606846976 bytes (1 EiB)"),
    ('size = "2GiB"', 'size = "1000TiB"', 'size = "1000TiB"',
     "guest[1].ram[0].size: guest g2 would have"),
    ('bandwidth_limit = "1GiB"', 'bandwidth_limit = "' + "9" * 400 + 'TiB"',
     "bandwidth_limit", "migration.bandwidth_limit: '999"),
    ('on_timeout = "force"', 'on_timeout = "explode"', "on_timeout",
     "migration.on_timeout: must be one of ['cancel', 'force'], not 'explode'"),
    ('bandwidth_limit = "1GiB"', 'bandwidth_limit = "fast"', "bandwidth_limit",
     "migration.bandwidth_limit: 'fast' is not a size"),
    ('ca = "/etc/vfiod/ca.pem"', "", "[migration.tls]", "migration.tls.ca: is required"),
    ('memory = "4GiB"', 'memory = "4GiB"\nram = []', 'memory = "4GiB"',
     "guest[0].memory: give either memory (one region) or [[guest.ram]]"),
    ('memory = "4GiB"', 'memory = "4097"', "memory = \"4097\"",
     "guest[0].memory: 4097 bytes is not a multiple of 4096"),
    ('name = "g2"', 'name = "g1"', 'name = "g1"',
     "guest[1].name: guest name 'g1' is used twice"),
    ('gpa = "4GiB"', 'gpa = "1GiB"', 'gpa = "1GiB"',
     "guest[1].ram[1].gpa: RAM region high [0x40000000, 0xc0000000) overlaps low"),
    ("page_size = 2097152", "page_size = 3000000", "page_size",
     "guest[1].page_size: 3000000 is not a power of two"),
    ('path = "/dev/hugepages/g2-low"', 'path = "hugepages/g2-low"', "path =",
     "guest[1].ram[0].path: must be an absolute path"),
    ('path = "/dev/hugepages/g2-low"', 'path = "/dev/hugepages/g2-low"\nfrom = "vmm"',
     'from = "vmm"', "guest[1].ram[0].from: give either path (vfiod opens the file) or "
     'from = "vmm"'),
    ('page_size = 2097152', 'page_size = 2097152\nrunstate = "qmp:vm.qmp"', "runstate",
     "guest[1].runstate: 'qmp:vm.qmp' is not valid: \"qmp:/run/vm1.qmp\" or "),
    ('page_size = 2097152', 'page_size = 2097152\nrunstate_timeout_s = 0', "runstate_t",
     "guest[1].runstate_timeout_s: "),
    ('path = "/dev/hugepages/g2-low"', 'from = "qemu"', 'from = "qemu"',
     "guest[1].ram[0].from: 'qemu' is not valid: \"vmm\": the VMM hands the fd over"),
    ('start = "incoming"', 'start = "later"', "start =",
     "guest[1].start: must be one of ['running', 'incoming']"),
    ('container = "c1"', 'container = "c 1"', "container =",
     "guest[0].device[1].container: 'c 1' is not valid"),
    ('id = "nic0"', 'id = "nic 0"', 'id = "nic 0"',
     "guest[0].device[0].id: 'nic 0' is not valid: letters, digits and '_.+-', at most 64, "
     "the same on both hosts"),
    ('id = "nic0"', 'id = 3', 'id = 3', "guest[0].device[0].id: must be a string"),
    ('container = "c1"', 'id = "nic0"\ncontainer = "c1"', 'id = "nic0"',
     "guest[0].device[1].id: device id 'nic0' of 6c4e8e12-0b1a-4d1e-9d4f-2b7a3c5e0a11 is "
     "already the id of 0000:3b:00.1 in guest g1 (a device without id has its name as id): "
     "ids must be unique within a guest"),
    ('id = "nic0"', 'id = "6c4e8e12-0b1a-4d1e-9d4f-2b7a3c5e0a11"',
     'name = "6c4e8e12-0b1a-4d1e-9d4f-2b7a3c5e0a11"',
     "guest[0].device[1].name: device id '6c4e8e12-0b1a-4d1e-9d4f-2b7a3c5e0a11' of "
     "6c4e8e12-0b1a-4d1e-9d4f-2b7a3c5e0a11 is already the id of 0000:3b:00.1"),
    ("pre_copy_dirty_page_tracking = false", "pre_copy_dirty_page_tracking = 0",
     "pre_copy_dirty_page_tracking", "must be true or false, not an integer 0"),
    ('group = "vfiod"', 'group = 5', 'group = 5', "control.group: must be a string"),
    ('socket = "/run/vfiod/control.sock"', 'socket = "control.sock"', "socket =",
     "control.socket: 'control.sock' must be an absolute path"),
    ('state = "/srv/vfiod/state"', 'state = "state"', "state =",
     "paths.state: 'state' must be an absolute path"),
])
def test_bad_file_names_key_and_line(tmp_path: Path, old: str, new: str, at: str,
                                     message: str) -> None:
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    f = tmp_path / "vfiod.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(str(f))
    line = _last_line_of(text, at)
    assert str(exc.value).startswith(f"{f}:{line}: "), str(exc.value)
    assert message in str(exc.value)


def test_duplicate_device_across_guests() -> None:
    text = GOOD + '[[guest.device]]\nname = "0000:3b:00.1"\n'
    with pytest.raises(ConfigError, match=r"\(text\):\d+: guest\[1\]\.device\[0\]\.name: "
                                          r"device 0000:3b:00.1 already belongs to guest g1"):
        parse_config(text)


def test_sim_sizes_have_a_ceiling() -> None:
    base = ('[sim]\n[[sim.device]]\nname = "0000:3b:00.1"\nstate_size = ' + "9" * 30
            + "\n")
    with pytest.raises(ConfigError, match=r"^\(text\):4: sim\.device\[0\]\.state_size: 9+ is "
                       r"\d+ bytes, above the limit of 1073741824 bytes \(1 GiB\)$"):
        parse_config(base)
    with pytest.raises(ConfigError, match=r"^\(text\):4: sim\.device\[0\]\.precopy_size: "):
        parse_config(base.replace("state_size", "precopy_size").replace("9" * 30,
                                                                        '"16TiB"'))


def test_guest_memory_is_compared_with_the_host() -> None:
    text = '[[guest]]\nname = "g"\nmemory = "64MiB"\n'
    assert parse_config(text, host_memory=64 << 20).guests[0].ram_bytes == 64 << 20
    with pytest.raises(ConfigError, match=r"^\(text\):3: guest\[0\]\.memory: guest g would "
                       r"have 67108864 bytes of RAM, more than this host's 33554432 bytes$"):
        parse_config(text, host_memory=32 << 20)


def test_sim_section_errors() -> None:
    base = host_config("source", extra_sim=UNOWNED)
    with pytest.raises(ConfigError, match=r"sim\.device\[0\]\.capability: must be one of"):
        parse_config(base.replace('"v2_precopy_p2p_log"', '"v9"'))
    dup = base + '[[sim.host_device]]\nname = "0000:3b:00.1"\n'
    with pytest.raises(ConfigError, match=r"sim\.host_device\[1\]\.name: simulated device "
                                          r"0000:3b:00.1 is defined twice"):
        parse_config(dup)
    with pytest.raises(ConfigError, match=r"sim\.workload\[0\]\.guest: no \[\[guest\]\] named"):
        parse_config(base + '[[sim.workload]]\nguest = "nope"\ndirty_rate = 1\n')


def test_container_map_errors() -> None:
    base = host_config("source")
    with pytest.raises(ConfigError, match=r"guest\[0\]\.container\[0\]\.map: no RAM "
                                          r"region\(s\) \['nope'\]"):
        parse_config(base.replace('map = ["pool"]', 'map = ["nope"]'))
    with pytest.raises(ConfigError, match=re.escape("container[0].name: no [[guest.device]] "
                                                    "of guest g1 is in container 'c9'")):
        parse_config(base.replace('name = "c1"\nmap', 'name = "c9"\nmap'))


def test_syntax_error_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\(text\): not valid TOML: .*line 2"):
        parse_config("[control]\nsocket = \n")
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(str(tmp_path / "missing.toml"))
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(tmp_path / "latin1.toml"))


def test_key_lines_follow_arrays_of_tables() -> None:
    lines = KeyLines(GOOD)
    assert lines.line_of(("guest", 1, "ram", 1, "gpa")) == _line_of(GOOD, 'gpa = "4GiB"')
    assert lines.line_of(("guest", 0, "device", 1, "container")) == _line_of(GOOD, "container")
    # A key that is absent points at its table's header.
    assert lines.line_of(("guest", 1, "ram", 0, "gpa")) == GOOD.splitlines().index(
        "[[guest.ram]]") + 1


@pytest.mark.parametrize("text, value", [
    ("4096", 4096), (4096, 4096), ("64k", 65536), ("1.5GiB", 3 << 29), ("2 MB", 2_000_000),
    ("7x", None), ("1.1B", None), (True, None), (1.5, None),
    ("9" * 400 + "TiB", int("9" * 400) << 40),        # exact: no float overflow
])
def test_sizes(text: object, value: int | None) -> None:
    assert parse_size(text) == value
