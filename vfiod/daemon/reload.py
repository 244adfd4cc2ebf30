"""SIGHUP: apply what can change while the daemon runs, list what needs a restart
(docs/architecture.md §6 "SIGHUP reload config").

Applied at once: the migration defaults (downtime limit, timeout, on_timeout, bandwidth
limit: they are read when a migration starts), the ``[[observe]]`` devices
(docs/architecture.md §8.5: vfiod holds nothing of them) and each device's
``pre_copy_dirty_page_tracking`` (for guests not migrating right now; a migrating guest
keeps its setting and the change is listed as needing a restart, or another reload).
Everything else (control socket, metrics and migration listeners, TLS files, paths,
guests, RAM, the simulated host) is compared and, if it changed, named in the returned
list, which ``vfiod ctl status`` shows as ``restart_needed``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from vfiod.daemon.config import Config, GuestConfig

if TYPE_CHECKING:
    from vfiod.daemon.main import Daemon

log = logging.getLogger("vfiod.reload")


def _without_flags(g: GuestConfig) -> GuestConfig:
    devs = tuple(dataclasses.replace(d, pre_copy_dirty_page_tracking=True) for d in g.devices)
    return dataclasses.replace(g, devices=devs)


def apply_reload(daemon: Daemon, new: Config) -> list[str]:
    old = daemon.config
    restart: list[str] = []
    for name in ("control", "metrics", "paths", "sim"):
        if getattr(old, name) != getattr(new, name):
            restart.append(f"[{name}]")
    if (old.migration.listen, old.migration.tls) != (new.migration.listen, new.migration.tls):
        restart.append("[migration] listen/tls")
    if tuple(map(_without_flags, old.guests)) != tuple(map(_without_flags, new.guests)):
        restart.append("[[guest]] (guests, RAM or devices)")
    daemon.migrations.defaults = new.migration
    daemon.observed.replace(new.observe)
    old_flags = {(g.name, d.name): d.pre_copy_dirty_page_tracking
                 for g in old.guests for d in g.devices}
    for g in new.guests:
        entry = daemon.registry.guest(g.name)
        if entry is None:
            continue
        for d in g.devices:
            before = old_flags.get((g.name, d.name))
            if before is None or before == d.pre_copy_dirty_page_tracking:
                continue
            if d.name not in entry.devices:
                continue
            with daemon.registry.lock:
                busy = entry.migration is not None and entry.migration.active
                if not busy:
                    daemon.guests.set_tracking(entry, d.name, d.pre_copy_dirty_page_tracking)
            if busy:
                restart.append(f"{d.name} pre_copy_dirty_page_tracking (guest {g.name} "
                               "was migrating; reload again after it ends)")
            else:
                log.info("reload: %s pre_copy_dirty_page_tracking = %s", d.name,
                         d.pre_copy_dirty_page_tracking)
    return restart
