"""One real ``vfiod run --backend sim`` process: READY over a real NOTIFY_SOCKET, ``vfiod
ctl`` against its socket, /metrics scraped over HTTP and checked, bad control messages,
SIGHUP reload (good and bad files), SIGTERM (docs/architecture.md §6)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon_configs import UNOWNED, host_config
from tests.support.daemons import DaemonProcess, child_env, vfiod_cmd
from vfiod.api import MAX_LINE

CONFIG = host_config("source", guests=("g1",), extra_sim=UNOWNED,
                     workloads={"g1": ("64KiB", "1MiB")})
ALLOWED_LABELS = {"guest", "device", "phase", "result", "protocol", "tracker", "version",
                  "backend", "le"}


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    d = DaemonProcess(CONFIG, "proc")
    try:
        d.wait_ready()
        yield d
    finally:
        d.cleanup()


def ctl_json(d: DaemonProcess, *args: str) -> tuple[int, dict]:
    r = d.ctl(*args, "--json")
    assert r.stdout, f"no output from vfiod ctl {args}: {r.stderr}"
    return r.returncode, json.loads(r.stdout)


def test_ready_is_sent_once_serving(daemon: DaemonProcess) -> None:
    status = daemon.ready["STATUS"]
    assert f"control {daemon.socket}" in status
    assert "1 guest(s) (1 running)" in status
    # READY came after the socket listened: a request works at once.
    assert daemon.call("hello")["backend"] == "sim"


def test_ctl_status(daemon: DaemonProcess) -> None:
    code, r = ctl_json(daemon, "status")
    assert code == 0
    (g1,) = r["guests"]
    assert g1["state"] == "running" and g1["error"] is None
    states = {d["name"]: (d["protocol"], d["state_label"], d["tracker"]) for d in g1["devices"]}
    assert states == {"0000:3b:00.1": ("v2", "RUNNING", "device-logging"),
                      "0000:3c:00.0": ("v2", "RUNNING", "device-logging")}
    human = daemon.ctl("status")
    assert human.returncode == 0
    assert "guest g1: running" in human.stdout
    assert "pre-copy tracking OFF (opt-out)" in human.stdout


def test_ctl_devices_says_whose_and_why(daemon: DaemonProcess) -> None:
    code, r = ctl_json(daemon, "devices")
    assert code == 0
    by = {d["name"]: d for d in r["devices"]}
    assert by["0000:3b:00.1"]["guest"] == "g1"
    assert by["0000:5f:00.0"]["guest"] is None and by["0000:5f:00.0"]["vfio_capable"]
    assert by["0000:60:00.0"]["reason"] == "bound to host driver ixgbe (not ours)"
    assert not by["0000:60:00.0"]["vfio_capable"]


def test_ctl_devices_says_which_can_migrate(daemon: DaemonProcess) -> None:
    code, r = ctl_json(daemon, "devices")
    assert code == 0
    by = {d["name"]: d for d in r["devices"]}
    assert by["0000:3b:00.1"]["migratable"] is True                  # g1's, opened
    assert by["0000:3b:00.1"]["migratable_reason"] is None
    assert by["0000:5f:00.0"]["migratable"] is False                 # probed on the spot
    assert by["0000:5f:00.0"]["migratable_reason"] == (
        "VFIO_DEVICE_FEATURE MIGRATION: ENOTTY and no v1 migration region")
    assert by["0000:60:00.0"]["migratable_reason"] == "bound to host driver ixgbe (not ours)"
    human = daemon.ctl("devices").stdout
    (line,) = [ln for ln in human.splitlines() if ln.startswith("0000:5f:00.0")]
    assert "cannot migrate: VFIO_DEVICE_FEATURE MIGRATION: ENOTTY" in line, human


def test_ctl_check(daemon: DaemonProcess) -> None:
    code, r = ctl_json(daemon, "check", "g1")
    assert code == 0 and r["migratable"], r
    assert any("opt-out" in n for n in r["notes"])
    assert not any("no id is configured" in n for n in r["notes"])
    assert "  0000:3b:00.1 (id nic0): v2 (" in daemon.ctl("check", "g1").stdout
    code, r = ctl_json(daemon, "check", "0000:5f:00.0")        # probed on the spot
    assert code == 1 and not r["migratable"]
    assert r["blockers"] == ["VFIO_DEVICE_FEATURE MIGRATION: ENOTTY and no v1 migration "
                             "region"]
    code, r = ctl_json(daemon, "check", "0000:5e:00.0")
    assert code == 0 and r["protocol"] == "v1", r
    human = daemon.ctl("check", "nonesuch")
    assert human.returncode == 5
    assert "no guest or device 'nonesuch'" in human.stderr


def test_dirty_tracking_flag_round_trip(daemon: DaemonProcess) -> None:
    r = daemon.ctl("dirty-tracking", "0000:3b:00.1", "off")
    assert r.returncode == 0, r.stderr
    assert "pre-copy dirty page tracking off" in r.stdout
    dev = daemon.call("status")["guests"][0]["devices"][0]
    assert dev["name"] == "0000:3b:00.1" and dev["pre_copy_dirty_page_tracking"] is False
    assert daemon.ctl("dirty-tracking", "0000:3b:00.1", "on").returncode == 0
    assert daemon.ctl("dirty-tracking", "0000:5f:00.0", "on").returncode == 5


def test_ctl_usage_errors(daemon: DaemonProcess) -> None:
    r = daemon.ctl("migrate", "g1", "--to", "no-port-here")
    assert r.returncode == 2
    assert "must be HOST:PORT" in r.stderr
    r = daemon.ctl("migrate", "nosuch", "--to", "127.0.0.1:1")
    assert r.returncode == 5
    r = daemon.ctl("migrate", "g1", "--to", "127.0.0.1:1", "--on-timeout", "force")
    assert r.returncode == 2 and "--on-timeout needs --timeout" in r.stderr
    r = daemon.ctl("cancel", "g1")
    assert r.returncode == 5 and "no migration running" in r.stderr
    r = subprocess.run(vfiod_cmd("ctl", "--socket", str(daemon.dir / "nope.sock"), "status"),
                       capture_output=True, text=True, env=child_env(), timeout=60)
    assert r.returncode == 3 and "is the daemon running?" in r.stderr


def test_metrics_scrape(daemon: DaemonProcess) -> None:
    addr = daemon.metrics_address
    assert addr.startswith("127.0.0.1:")
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=30).read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("vfiod_device_migration_state", "vfiod_device_pre_copy_dirty_tracking_enabled",
                 "vfiod_migration_downtime_seconds", "vfiod_dirty_sync_duration_seconds",
                 "vfiod_process_resident_memory_bytes", "vfiod_process_locked_memory_bytes",
                 "vfiod_process_pinned_memory_bytes", "vfiod_migrations",
                 "vfiod_migration_active", "vfiod_build_info", "vfiod_scrape_errors"):
        assert name in fams, f"{name} missing from /metrics"
    for fam in fams.values():
        assert fam.name.startswith("vfiod_")
        for s in fam.samples:
            assert set(s.labels) <= ALLOWED_LABELS, (s.name, s.labels)
    opt = {s.labels["device"]: s.value
           for s in fams["vfiod_device_pre_copy_dirty_tracking_enabled"].samples}
    assert opt == {"0000:3b:00.1": 1.0, "0000:3c:00.0": 0.0}
    state = {s.labels["device"]: s.value for s in fams["vfiod_device_migration_state"].samples}
    assert state == {"0000:3b:00.1": 2.0, "0000:3c:00.0": 2.0}         # RUNNING
    pinned = fams["vfiod_process_pinned_memory_bytes"].samples[0].value
    assert pinned == (64 + 8) << 20          # c0 maps all RAM, c1 only the 8 MiB pool
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus); the "
                    "prometheus_client parser check above passed")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _raw_exchange(path: str, payload: bytes, sock: socket.socket | None = None
                  ) -> tuple[socket.socket, dict]:
    s = sock or socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if sock is None:
        s.settimeout(30)
        s.connect(path)
    s.sendall(payload)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        assert chunk, "daemon closed the connection"
        buf += chunk
    return s, json.loads(buf)


def test_bad_control_messages_get_clear_errors(daemon: DaemonProcess) -> None:
    s, r = _raw_exchange(daemon.socket, b"this is not json\n")
    try:
        assert r["ok"] is False and r["error"]["code"] == "bad_json"
        _, r = _raw_exchange(daemon.socket, b'{"schema": 99, "id": 4, "op": "status"}\n', s)
        assert r["error"]["code"] == "unsupported_schema" and r["id"] == 4
        assert "speaks 1..1" in r["error"]["message"]
        _, r = _raw_exchange(daemon.socket, b'{"schema": 1, "id": 5, "op": "reboot"}\n', s)
        assert r["error"]["code"] == "unknown_op"
        _, r = _raw_exchange(daemon.socket, b'{"schema": 1, "id": 6, "op": "migrate", '
                             b'"args": {"guest": "g1", "to": "h:1", "speed": 3}}\n', s)
        assert r["error"]["code"] == "bad_request"
        assert "unknown argument(s) ['speed']" in r["error"]["message"]
        # Still serving on the same connection.
        _, r = _raw_exchange(daemon.socket, b'{"schema": 1, "id": 7, "op": "hello"}\n', s)
        assert r["ok"] is True and r["id"] == 7
        # A line over the limit cannot be resynchronised: error, then the daemon hangs up.
        _, r = _raw_exchange(daemon.socket, b"x" * (MAX_LINE + 1), s)
        assert r["error"]["code"] == "too_large"
        assert s.recv(10) == b""
    finally:
        s.close()
    assert daemon.call("hello")["schema"] == 1          # and serves new connections


def test_sighup_reload(daemon: DaemonProcess) -> None:
    good = daemon.config_path.read_text()
    n = len(daemon.notify.messages)
    daemon.config_path.write_text(good.replace("[migration]\n", "[migration]\nlisten = 3\n"))
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("RELOADING", after=n)
    msg = daemon.notify.wait_for("READY", after=n)
    assert "reload refused" in msg["STATUS"]
    err = daemon.call("status")["daemon"]["reload_error"]
    assert "vfiod.toml:2: migration.listen: must be a string" in err
    # A good file: the opt-out of a device changes at once, nothing needs a restart.
    n = len(daemon.notify.messages)
    daemon.config_path.write_text(good.replace("pre_copy_dirty_page_tracking = false\n", ""))
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("RELOADING", after=n)
    daemon.notify.wait_for("READY", after=n)
    st = daemon.call("status")
    assert st["daemon"]["reload_error"] is None and st["daemon"]["restart_needed"] == []
    flags = {d["name"]: d["pre_copy_dirty_page_tracking"] for d in st["guests"][0]["devices"]}
    assert flags["0000:3c:00.0"] is True
    daemon.config_path.write_text(good)


def test_sigterm_stops_cleanly() -> None:
    d = DaemonProcess(host_config("source"), "term")
    try:
        d.wait_ready()
        n = len(d.notify.messages)
        assert d.stop() == 0, d.log()
        assert any(m.get("STOPPING") == "1" for m in d.notify.messages[n:]), d.notify.messages
        assert not (d.dir / "control.sock").exists()
        assert "stopped" in d.log()
    finally:
        d.cleanup()


def test_bad_config_is_refused_naming_key_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(host_config("source").replace('size = "8MiB"', 'size = "8 parsecs"'))
    r = subprocess.run(vfiod_cmd("run", "--backend", "sim", "--config", str(bad),
                                 "--control-socket", str(tmp_path / "c.sock")),
                       capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode == 1
    line = bad.read_text().splitlines().index('size = "8 parsecs"') + 1
    assert f"{bad}:{line}: guest[0].ram[1].size: '8 parsecs' is not a size" in r.stderr
    assert not (tmp_path / "c.sock").exists()
