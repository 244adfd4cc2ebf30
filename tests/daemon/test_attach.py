"""A VMM hands a guest's RAM over with ``attach`` (SCM_RIGHTS on the control socket) and
takes it back with ``detach`` (docs/architecture.md §8.1), on the sim backend with real
daemon processes: the attached memfd backs the guest like a ``[[guest.ram]] path`` file,
the guest migrates to another daemon whose VMM attached zeroed RAM, and that RAM then
equals the source's. Every bad fd is refused with its reason, and nothing is held.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator

import pytest

from tests.support.daemons import DaemonProcess, daemon_pair, guest_status, wait_until
from tests.support.vmm_ram import MIB, VmmRam, held_memfds, layout
from vfiod.api import ClientError

RAM, POOL = 8 * MIB, 4 * MIB


def _config(side: str) -> str:
    start = "running" if side == "source" else "incoming"
    dev = "0000:3b:00.1" if side == "source" else "0000:81:00.1"
    text = "[migration]\n" + ('listen = "127.0.0.1:0"\n' if side == "destination" else "")
    for guest in ("v1", "v2"):
        text += f'''
[[guest]]
name = "{guest}"
start = "{start}"
[[guest.ram]]
name = "ram"
size = "{RAM}"
from = "vmm"
[[guest.ram]]
name = "pool"
gpa = "{RAM}"
size = "{POOL}"
from = "vmm"
'''
    text += f'[[guest.device]]\nname = "{dev}"\nid = "nic0"\n'   # v2's device
    return text + f'\n[sim]\n[[sim.device]]\nname = "{dev}"\ncapability = "v2_precopy_p2p_log"\n'


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    with daemon_pair(_config("source"), _config("destination"), "vsrc", "vdst") as daemons:
        yield daemons


def _attach(d: DaemonProcess, guest: str, ram: list[dict], fds: list[int]) -> dict:
    with d.client() as c:
        return c.call("attach", {"guest": guest, "ram": ram}, fds=fds)


def _both(ram: VmmRam) -> list[dict]:
    """ram at offset 0 and pool right after it, both in one memfd."""
    return [layout("ram", 0, RAM, 0), layout("pool", RAM, POOL, RAM)]


def test_attached_ram_migrates_and_detach_gives_it_back(pair) -> None:
    src, dst = pair
    assert guest_status(src, "v2")["state"] == "defined"       # waits for its VMM
    src_ram, dst_ram = VmmRam("vmm-src-v2", RAM + POOL), VmmRam("vmm-dst-v2", RAM + POOL)
    try:
        src_ram.fill(seed=7)
        r = _attach(src, "v2", _both(src_ram), [src_ram.fd])
        assert (r["state"], r["ram"]) == ("running", ["pool", "ram"]), r
        assert _attach(dst, "v2", _both(dst_ram), [dst_ram.fd])["state"] == "incoming"
        # the daemon holds a copy of the fd per region, and each region's mmap object its
        # own (Python's mmap keeps a dup of the fd it maps)
        assert len([h for h in held_memfds(src, "vmm-src-v2") if h.startswith("fd ")]) == 4
        m = src.ctl("migrate", "v2", "--to", dst.migration_address, "--json")
        assert m.returncode == 0, m.stdout + m.stderr + src.log() + dst.log()
        final = json.loads(m.stdout.strip().splitlines()[-1])["migration"]
        assert final["result"] == "completed" and final["verified"] is True, final
        wait_until(lambda: guest_status(dst, "v2")["state"] == "running", 30,
                   "v2 to run on the destination")
        assert dst_ram.content() == src_ram.content()
        # the source released it: vfiod's copies closed, the VMM re-attaches to take it back
        wait_until(lambda: guest_status(src, "v2")["state"] == "defined", 30,
                   "v2 released on the source")
        assert held_memfds(src, "vmm-src-v2") == []
        assert dst.call("detach", {"guest": "v2"})["state"] == "defined"
        assert held_memfds(dst, "vmm-dst-v2") == []
        os.pread(dst_ram.fd, 1, 0)                    # the VMM's own fd still works
    finally:
        src_ram.close()
        dst_ram.close()


def _refused(d: DaemonProcess, ram: list[dict], fds: list[int], memfd: str) -> str:
    with pytest.raises(ClientError) as e:
        _attach(d, "v1", ram, fds)
    assert guest_status(d, "v1")["state"] == "defined"
    assert held_memfds(d, memfd) == []
    return e.value.message


def test_each_bad_fd_is_refused_naming_it_and_nothing_is_held(pair) -> None:
    src, _ = pair
    good, small = VmmRam("vmm-bad", RAM + POOL), VmmRam("vmm-bad", RAM)
    rd, wr = os.pipe()
    with tempfile.NamedTemporaryFile() as f:
        f.truncate(RAM + POOL)
        read_only = os.open(f.name, os.O_RDONLY)
        try:
            msg = _refused(src, [layout("ram", 0, RAM), layout("pool", RAM, POOL, fd=1)],
                           [good.fd, rd], "vmm-bad")
            assert "fd index 1 (region pool) is a fifo, not a memory file" in msg, msg
            msg = _refused(src, [layout("ram", 0, RAM), layout("pool", RAM, POOL, RAM, 1)],
                           [good.fd, small.fd], "vmm-bad")
            assert (f"fd index 1 (region pool) is {RAM} bytes; the region needs {POOL} "
                    f"bytes at offset {RAM:#x}") in msg, msg
            msg = _refused(src, [layout("ram", 0, RAM), layout("pool", RAM, POOL, RAM, 1)],
                           [good.fd, read_only], "vmm-bad")
            assert "fd index 1 (region pool) is not open read-write" in msg, msg
            # the same memfd sent twice, both regions on its first bytes
            msg = _refused(src, [layout("ram", 0, RAM), layout("pool", RAM, POOL, 0, 1)],
                           [good.fd, good.fd], "vmm-bad")
            assert ("regions ram (fd index 0) and pool (fd index 1) are the same bytes of "
                    "one file: a duplicated fd") in msg, msg
            msg = _refused(src, _both(good)[:1], [good.fd], "vmm-bad")
            assert "region(s) ['pool'] were not handed over" in msg, msg
            msg = _refused(src, [layout("ram", 0, RAM), layout("pool", 2 * RAM, POOL, RAM)],
                           [good.fd], "vmm-bad")
            assert "region pool is configured at gpa 0x800000" in msg, msg
            msg = _refused(src, [layout("ram", 0, RAM), layout("pool", RAM, POOL, RAM, 1)],
                           [good.fd], "vmm-bad")
            assert "region pool names fd index 1, but 1 fd(s) came with the request" in msg
            msg = _refused(src, _both(good), [good.fd, rd], "vmm-bad")
            assert ("fd index(es) [1] came with the request but no region or VFIO object "
                    "uses them") in msg, msg
            assert all("nothing was attached" in m for m in [msg])
            # a closed fd never leaves the VMM: the client says which
            closed = os.dup2(good.fd, 1000)         # high: no socket reuses its number
            os.close(closed)
            with pytest.raises(ClientError) as e:
                _attach(src, "v1", _both(good), [closed])
            assert e.value.kind == "fds" and f"fd(s) [{closed}] are not open" in e.value.message
            # fds with any other request are refused, and closed
            with src.client() as c, pytest.raises(ClientError) as e:
                c.call("status", {}, fds=[good.fd])
            assert "status: 1 fd(s) came with it; only attach takes fds" in e.value.message
            assert held_memfds(src, "vmm-bad") == []
            # and then the right fd is taken
            assert _attach(src, "v1", _both(good), [good.fd])["state"] == "running"
            # the same RAM for another guest: refused, naming the guest that has it
            with pytest.raises(ClientError) as e:
                _attach(src, "v2", _both(good), [good.fd])
            assert ("fd index 0 (region ram) is RAM guest v1 already uses (its region ram): "
                    "a foreign fd") in e.value.message, e.value.message
            assert guest_status(src, "v2")["state"] == "defined"
            with pytest.raises(ClientError) as e:
                _attach(src, "v1", _both(good), [good.fd])
            assert "already attached (detach first)" in e.value.message
            assert src.call("detach", {"guest": "v1"})["state"] == "defined"
            assert held_memfds(src, "vmm-bad") == []
        finally:
            for fd in (rd, wr, read_only):
                os.close(fd)
            good.close()
            small.close()
