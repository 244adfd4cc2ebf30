"""Two vfiod daemons beside two real QEMUs, for the coordinated-switchover tests
(docs/architecture.md §8.3): the daemons' configuration for a guest whose RAM is QEMU's
shared file, the migration with a fault injected while it runs, and the check that the
guest runs at home afterwards (one owner, nothing lost).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.daemons import DaemonProcess, guest_status, vfiod_cmd, wait_until

#: device names on the two simulated hosts; the same id pairs them
DEVICES = {"source": "0000:3b:00.1", "destination": "0000:81:00.1"}


def coordinated_config(side: str, guest: str, ram_size: str, ram_path: Path | str,
                       vfiod_qmp: str, *, incoming_port: int | None = None,
                       span: tuple[int, int] | None = None, dirty_rate: str = "2MiB",
                       state: str = "") -> str:
    """A daemon config: ``guest`` with RAM ``ram_path`` (QEMU's ``mem-path``) and
    ``[guest.qemu]`` on ``vfiod_qmp``; the destination listens and names its QEMU's
    ``incoming_port``; on the source a simulated device writes ``span`` (gpa, size) at
    ``dirty_rate``; ``state``: a device state that size, over a link capped at 64 MiB/s
    (a long stop-and-copy)."""
    device = DEVICES[side]
    text = "[migration]\n"
    if side == "destination":
        text += 'listen = "127.0.0.1:0"\n'
    elif state:
        text += 'bandwidth_limit = "64MiB"\n'
    text += (f'\n[[guest]]\nname = "{guest}"\n'
             f'start = "{"running" if side == "source" else "incoming"}"\n'
             f'[[guest.ram]]\nname = "ram"\nsize = "{ram_size}"\npath = "{ram_path}"\n'
             f'[[guest.device]]\nname = "{device}"\nid = "dma0"\n'
             f'[guest.qemu]\nqmp = "{vfiod_qmp}"\ntimeout_s = 30\n')
    if incoming_port is not None:
        text += f'incoming = "tcp:0.0.0.0:{incoming_port}"\n'
    text += f'\n[sim]\n[[sim.device]]\nname = "{device}"\ncapability = "v2_precopy_p2p_log"\n'
    if state:
        text += f'state_size = "{state}"\nprecopy_size = "0"\n'
    if side == "source" and span is not None:
        text += (f'[[sim.workload]]\nguest = "{guest}"\ndirty_rate = "{dirty_rate}"\n'
                 f'gpa = "{span[0]}"\nsize = "{span[1]}"\n')
    return text


def migrate_with_fault(src: DaemonProcess, dst: DaemonProcess, guest: str,
                       when: Callable[[], bool], what: str, fault: Callable[[], None]
                       ) -> dict[str, Any]:
    """``vfiod ctl migrate`` as a process; once ``when()`` (``what``), ``fault()``; the
    migration's final record (its output and the daemons' logs under ``"diagnostics"``)."""
    ctl = subprocess.Popen(vfiod_cmd("ctl", "--socket", src.socket, "migrate", guest, "--to",
                                     dst.migration_address, "--json"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(when, 60, what)
        fault()
        out, err = ctl.communicate(timeout=90)
    finally:
        if ctl.poll() is None:
            ctl.kill()
    final = dict(json.loads(out.strip().splitlines()[-1])["migration"]) if out.strip() else {}
    final["diagnostics"] = out + err + src.log() + dst.log()
    return final


def assert_runs_at_home(src: DaemonProcess, dst: DaemonProcess, guest: str) -> None:
    """The guest runs on the source with its devices RUNNING, not on the destination."""
    g = wait_until(lambda: (g := guest_status(src, guest))["state"] == "running" and g,
                   30, f"{guest} to run at home")
    assert {d["state_label"] for d in g["devices"]} == {"RUNNING"}, g
    assert guest_status(dst, guest)["state"] != "running"
