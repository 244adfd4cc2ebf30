"""Two daemons migrating over RAM channels (docs/protocol.md §12): ``[migration]
channels = 2`` and a bandwidth limit on the source; the destination daemon routes the two channel connections
(offers of kind ``channel``) to the session of that migration, which completes verified.
A channel offer naming a migration that does not wait for channels is refused."""

from __future__ import annotations

import json

from tests.support.daemon_configs import host_config
from tests.support.daemons import daemon_pair, guest_status, wait_until
from vfiod.daemon.offer import Offer, send_offer
from vfiod.migration.transport import TransportError, connect


def test_a_daemon_migration_over_two_channels_completes_verified() -> None:
    # with a bandwidth limit: each channel is paced to half of it (channel_routes.py)
    with daemon_pair(host_config("source", migration='channels = 2\nbandwidth_limit = "256MiB"\n',
                                 workloads={"g1": ("128KiB", "2MiB")}),
                     host_config("destination"), "src", "dst") as (src, dst):
        host, port = dst.migration_address.rsplit(":", 1)
        stray = connect(host, int(port), timeout=10)
        try:       # no migration of that id waits for channels: refused, with the reason
            send_offer(stray, Offer("g1", "nosuchid", kind="channel"), 10)
            raise AssertionError("a channel offer for no migration was accepted")
        except TransportError as e:
            assert "no migration 'nosuchid' waits for RAM channels" in str(e), e
        finally:
            stray.close()
        r = src.ctl("migrate", "g1", "--to", dst.migration_address, "--timeout", "60",
                    "--on-timeout", "force", "--json")
        assert r.returncode == 0, r.stdout + r.stderr + src.log() + dst.log()
        final = json.loads(r.stdout.strip().splitlines()[-1])["migration"]
        assert final["result"] == "completed" and final["verified"] is True, final
        assert dst.log().count("RAM channel connection from") == 2, dst.log()
        wait_until(lambda: guest_status(dst, "g1")["state"] == "running", 30,
                   "g1 to run on the destination")


def test_ctl_migrate_channels_overrides_the_configured_number() -> None:
    """The daemon's default is one connection; ``ctl migrate --channels 3`` opens 3."""
    with daemon_pair(host_config("source"), host_config("destination"), "src",
                     "dst") as (src, dst):
        bad = src.ctl("migrate", "g1", "--to", dst.migration_address, "--channels", "0")
        assert bad.returncode == 2 and "'channels' must be an integer from 1 to 16" in \
            bad.stderr, bad.stderr
        r = src.ctl("migrate", "g1", "--to", dst.migration_address, "--channels", "3",
                    "--timeout", "60", "--on-timeout", "force", "--json")
        assert r.returncode == 0, r.stdout + r.stderr + src.log() + dst.log()
        final = json.loads(r.stdout.strip().splitlines()[-1])["migration"]
        assert final["result"] == "completed" and final["verified"] is True, final
        assert dst.log().count("RAM channel connection from") == 3, dst.log()
