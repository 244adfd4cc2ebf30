"""Two ``vfiod run --backend linux`` daemons in the guest migrate a guest whose device is
our own vfiod_dma (native/vfiod_dma/README.md; docs/architecture.md §6, §1 steps 5-8), with
the device DMA-writing the guest's RAM all through pre-copy: its background writer, a new
byte each lap over a few pages, runs in the source daemon's mm from the moment the daemon
opened the device until the switchover stops it.

Done when: the migration completes verified with a predicted and a measured downtime;
the destination's RAM file equals the source's at the pause byte for byte (so every
re-written page was sent again); the device state's crc32 on the destination equals the
source's.
"""

from __future__ import annotations

import pytest

from tests.kernel.guest.daemon_pair import GUEST, linux_daemon_pair
from tests.kernel.guest.native_dma import DmaControl
from tests.support.daemons import wait_until

#: two daemons start (10-20 s each under TCG) and migrate inside the test
pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
#: what is checked here is what arrives, not the predictor: a limit no run misses
DOWNTIME_LIMIT_MS = "5000"


def test_native_dma_daemons_migrate_a_dma_writing_device(
        native_dma_pair: tuple[str, str], numba_cache: None) -> None:
    a, b = native_dma_pair
    actl, bctl = DmaControl(a), DmaControl(b)
    actl.state_size = 2 * MiB + 5
    actl.fill(seed=0xDA)
    bctl.state_size = 4096
    bctl.fill(seed=0xAD)
    want = actl.checksum()
    assert bctl.checksum() != want
    with linux_daemon_pair(a, b, "dma", seed=8) as pair:
        p, q, p_ram, q_ram = pair.p, pair.q, pair.p_ram, pair.q_ram
        # P has the device open: its writer DMA-writes P's guest RAM through P's mappings
        actl.start_writer(rate=100, pattern=0x11, iova=2 * MiB, pages=16)
        wait_until(lambda: actl.writer()["written"] >= 16, 30, "the writer's first lap")
        to = q.call("status")["daemon"]["migration_listen"]
        out = p.ctl("migrate", GUEST, "--to", to, "--downtime-limit", DOWNTIME_LIMIT_MS)
        final = dict(out["migration"])
        assert (final["role"], final["result"], final["error"]) == (
            "source", "completed", None), (final, q.journal())
        assert final["verified"] is True, final
        assert final["downtime_s"] is not None and final["predicted_downtime_s"] is not None

        writer = actl.writer()          # P released the device: the writer stopped
        assert (writer["rate"], writer["error"]) == (0, 0) and writer["written"] > 16, writer
        g = q.guest(GUEST)
        assert (g["state"], g["migration"]["result"]) == ("running", "completed"), g
        # the state arrived whole; the RAM is P's at the pause, the last lap's bytes included
        assert (bctl.state_size, bctl.checksum()) == (2 * MiB + 5, want)
        assert q_ram.read_bytes() == p_ram.read_bytes()
