"""Two daemons pair devices by id (issue 10 item 4; docs/architecture.md §1.5): the
destination's configuration lists g1's devices in the other order than the source's.
The two devices differ in kind (migration flags): paired by position, the destination
would refuse to load one device's state into the other; paired by id, the migration
completes and each device runs on the destination."""

from __future__ import annotations

import json

from tests.support.daemon_configs import host_config
from tests.support.daemons import daemon_pair, guest_status, wait_until


def test_destination_listing_devices_in_the_other_order_migrates() -> None:
    src_cfg = host_config("source")
    dst_cfg = host_config("destination", reversed_devices=("g1",))
    assert dst_cfg.index('id = "nic1"') < dst_cfg.index('id = "nic0"')
    with daemon_pair(src_cfg, dst_cfg, "src", "dst") as (src, dst):
        r = src.ctl("migrate", "g1", "--to", dst.migration_address, "--timeout", "60",
                    "--on-timeout", "force", "--json")
        assert r.returncode == 0, r.stdout + r.stderr + src.log() + dst.log()
        final = json.loads(r.stdout.strip().splitlines()[-1])["migration"]
        assert final["result"] == "completed" and final["verified"] is True, final
        g = wait_until(lambda: (g := guest_status(dst, "g1"))["state"] == "running" and g,
                       30, "g1 to run on the destination")
        assert [(d["name"], d["state_label"]) for d in g["devices"]] == [
            ("0000:82:00.0", "RUNNING"), ("0000:81:00.1", "RUNNING")]
