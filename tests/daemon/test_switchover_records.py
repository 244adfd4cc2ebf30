"""The confirmed switchover's journal records, as the prediction counts them
(daemon/switchover_records.py, docs/architecture.md §1.7 and §4): the records each end
writes inside the downtime are ``SWITCHOVER_RECORDS``, and ``switchover_write_s`` prices
them at the time this host's journal takes per record."""

from __future__ import annotations

from pathlib import Path

from tests.support.daemon_configs import host_config
from tests.support.sim_vmm import sim_daemon_in_process
from vfiod.daemon.switchover_records import SWITCHOVER_RECORDS, MigrationJournal


def test_one_switchover_writes_the_records_its_prediction_counts(tmp_path: Path) -> None:
    with sim_daemon_in_process(tmp_path, host_config("destination", guests=("g1",))) as daemon:
        journal, ledger = daemon.journal, daemon.migrations.ledger
        assert journal is not None
        with daemon.registry.lock:
            rec, _ = ledger.begin("g1", "destination", "127.0.0.1:1", migration_id="m-1")
        records = MigrationJournal(journal, ledger, rec)
        before = journal.records_since_compaction
        # what the downtime holds: the source's decision, the destination's two steps
        records.committing(rec.id)      # (on the source's own journal, in a migration)
        records.prepared(rec.id)
        records.resuming(rec.id)
        assert journal.records_since_compaction - before == SWITCHOVER_RECORDS
        assert records.switchover_write_s() == SWITCHOVER_RECORDS * journal.write_s() > 0
