"""The daemon's wiring root: ``vfiod run`` (docs/architecture.md §6).

Start-up order, each step before the next, so ``READY=1`` means "serving":

1. the configuration (``config.py``; a bad file stops here, naming key and line), and the
   state directory (``[paths] state``, the journal's), made private (0700) if missing;
2. the kernel: ``LinuxKernel`` over /sys and /dev, or the simulated host of ``[sim]``;
3. the guests (``guests.py``): containers, groups, devices, RAM mapped for DMA, probes;
4. the migration listener (incoming migrations), the control socket, the metrics endpoint;
5. ``READY=1`` with a STATUS line, and the watchdog thread if systemd asked for one.

The main loop wakes at least every second (or a quarter of the watchdog interval), beats
the heartbeat the watchdog checks, refreshes STATUS while migrations run, freezes the heap
again when modules were imported since the last freeze (``HeapFreeze``), and acts on the
signals its self-pipe brings (``stopping.py``; the handlers only write to the pipe):
SIGHUP reloads the configuration (``RELOADING=1`` ... ``READY=1``): the migration
defaults and the per-device opt-out apply at once; what needs a restart (sockets, paths,
guests, the simulated host) is listed in ``vfiod ctl status``; a bad file is refused and
the running configuration stays.

SIGTERM/SIGINT stop, in this order: ``STOPPING=1`` (systemd stops watching the watchdog,
and so does vfiod); the control socket closes; every migration that has not committed is
cancelled and nothing new may start; the stop waits for the migration threads at most
``STOP_BUDGET_S`` (a source rolls back: devices RUNNING, the guest resumed; one past its
commit runs on to its end); a STATUS line says where the guests are; only then are the
guests' fds closed, except those of a guest whose thread still runs (left for the
process exit, logged with the reason). More signals during the stop change nothing.
"""

from __future__ import annotations

import gc
import grp
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfiod.api.ops import parse_host_port
from vfiod.daemon.config import DEFAULT_PATH, Config, load_config
from vfiod.daemon.control_server import ControlServer
from vfiod.daemon.guests import GuestManager
from vfiod.daemon.handlers import DaemonInfo, Handlers
from vfiod.daemon.history_store import HistoryStore
from vfiod.daemon.journal import Journal
from vfiod.daemon.metrics import MetricsServer, VfiodCollector
from vfiod.daemon.migrations import MigrationService
from vfiod.daemon.observe import ObservedDevices
from vfiod.daemon.recovery import recover
from vfiod.daemon.registry import Registry
from vfiod.daemon.stopping import STOP_BUDGET_S, STOP_SIGNALS, SignalPipe
from vfiod.daemon.systemd import Heartbeat, Notifier, Watchdog, watchdog_interval
from vfiod.errors import ConfigError, VfiodError
from vfiod.kernel.linux import LinuxKernel, pin_malloc_thresholds
from vfiod.kernel.ops import KernelOps
from vfiod.migration.planning.hostfacts import HostFacts, gather_host_facts
from vfiod.migration.transport import TransportError
from vfiod.vfio import HostPaths

log = logging.getLogger("vfiod")

#: README "Limits": glibc's own starting mmap and trim thresholds, pinned so that freeing
#: a large block does not raise them (``pin_malloc_thresholds``)
MALLOC_THRESHOLD = 128 << 10


@dataclass(frozen=True)
class RunOptions:
    backend: str = "linux"                 # "linux" | "sim"
    config: str | None = None              # None: DEFAULT_PATH if it exists, else defaults
    control_socket: str | None = None      # overrides [control] socket
    metrics_listen: str | None = None      # overrides [metrics] listen ("" = off)
    migration_listen: str | None = None    # overrides [migration] listen
    sim_root: str | None = None            # where the simulated host's tree lives


def read_config(opts: RunOptions) -> Config:
    path = opts.config
    if path is None:
        if not os.path.exists(DEFAULT_PATH):
            return Config()
        path = DEFAULT_PATH
    return load_config(path)


def _address(text: str, what: str) -> tuple[str, int]:
    try:
        return parse_host_port(text, what=what)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class Daemon:
    #: how long a stop waits for the migrations it cancelled (stopping.py)
    stop_budget_s = STOP_BUDGET_S

    def __init__(self, opts: RunOptions, config: Config, notifier: Notifier | None = None) -> None:
        self.opts = opts
        self.config = config
        self.notifier = notifier or Notifier()
        self.registry = Registry()
        self.heartbeat = Heartbeat()
        self.signals = SignalPipe()
        self._sim: Any = None
        self._sim_root: str | None = None
        self.kernel: KernelOps = LinuxKernel()
        self.paths = HostPaths(config.paths.sysfs, config.paths.dev)
        self.control: ControlServer | None = None
        self.metrics: MetricsServer | None = None
        self.watchdog: Watchdog | None = None
        sock = opts.control_socket or config.control.socket
        self.info = DaemonInfo(opts.backend, config.source, sock)
        self.guests: GuestManager
        self.migrations: MigrationService

    # -- start -----------------------------------------------------------------------------
    def start(self) -> None:
        # Signals first: systemd may send SIGTERM as soon as READY=1 (or before it).
        if threading.current_thread() is threading.main_thread():
            self.signals.install()
        if not pin_malloc_thresholds(MALLOC_THRESHOLD):
            log.warning("the C library has no mallopt: memory freed by finished migrations "
                        "may stay resident in its arenas")
        cfg, opts = self.config, self.opts
        make_state_dir(cfg.paths.state)
        self.journal = open_journal(cfg.paths.state, self.registry)
        workloads: tuple[Any, ...] = ()
        starter = None
        if opts.backend == "sim":
            from vfiod.daemon.simhost import (
                build_sim_host,
                make_sim_root,
                remove_stale_sim_roots,
                start_workload,
            )

            remove_stale_sim_roots()
            self._sim_root = opts.sim_root or make_sim_root()
            self._sim = build_sim_host(cfg.sim, Path(self._sim_root))
            self.kernel = self._sim.kernel
            self.paths = HostPaths(self._sim.sysfs_root, self._sim.dev_root)
            workloads = cfg.sim.workloads

            def starter(guest: Any, load: Any) -> Any:
                work = start_workload(self._sim, guest, load)
                return work.stop if work is not None else None
        # another VMM's devices: state read from debugfs, never opened (§8.5)
        self.observed = ObservedDevices(cfg.observe, self.kernel)
        self.guests = GuestManager(self.kernel, self.paths, self.registry, workloads=workloads,
                                   start_workload=starter)
        histories = HistoryStore.open(cfg.paths.state)
        self.info.history_warning = histories.warning or None
        self.migrations = MigrationService(self.registry, self.guests, self.host_facts,
                                           cfg.migration, cfg.migration.tls,
                                           journal=self.journal, histories=histories)
        recover(cfg.guests, self.journal, self.registry, self.guests, self.migrations)
        listen = opts.migration_listen or (str(cfg.migration.listen)
                                           if cfg.migration.listen else None)
        if listen:
            host, port = _address(listen, "--migration-listen")
            try:
                bound = self.migrations.listen(host, port)
            except TransportError as e:
                raise VfiodError(f"migration listener {listen}: {e}") from None
            self.info.migration_listen = f"{bound[0]}:{bound[1]}"
        self.migrations.resolution.start()
        self.control = ControlServer(
            self.info.control_socket,
            Handlers(self.registry, self.guests, self.migrations, self.kernel, self.paths,
                     self.host_facts, self.info, observed=self.observed),
            group=cfg.control.group, allowed_gid=_gid(cfg.control.group),
            on_request=self.registry.count_request, on_refused=self.registry.count_refused_peer)
        self.control.start()
        metrics = (opts.metrics_listen if opts.metrics_listen is not None
                   else (str(cfg.metrics.listen) if cfg.metrics.listen else ""))
        if metrics:
            host, port = _address(metrics, "--metrics-listen")
            pinned = (lambda: int(self.kernel.locked_bytes)) if self._sim else None  # type: ignore[attr-defined]
            try:
                self.metrics = MetricsServer(VfiodCollector(
                    self.registry, backend=opts.backend, pinned_bytes=pinned,
                    observed=self.observed.rows), host, port)
            except OSError as e:
                raise VfiodError(f"metrics endpoint {metrics}: {e.strerror}") from None
            self.info.metrics = self.metrics.address
        interval = watchdog_interval()
        if interval is not None:
            self.watchdog = Watchdog(self.notifier, interval, self.heartbeat)
            self.watchdog.start()
        log.info("ready: %s", self.status_line())
        self.notifier.ready(self.status_line())

    def host_facts(self) -> HostFacts:
        # on the sim backend the simulated kernel answers memlock with [sim] memlock_limit
        return gather_host_facts(self.kernel)

    def status_line(self) -> str:
        snap = self.registry.snapshot()
        states: dict[str, int] = {}
        for g in snap["guests"]:
            states[g["state"]] = states.get(g["state"], 0) + 1
        moving = [f"{g['name']} {g['migration']['role']} {g['migration']['progress']['phase']}"
                  for g in snap["guests"] if g["migration"] and g["migration"]["result"] is None]
        parts = [f"{len(snap['guests'])} guest(s)"
                 + (" (" + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ")"
                    if states else "")]
        if moving:
            parts.append("migrating: " + ", ".join(moving))
        parts.append(f"control {self.info.control_socket}")
        if self.info.metrics:
            parts.append(f"metrics {self.info.metrics}")
        if self.info.migration_listen:
            parts.append(f"incoming {self.info.migration_listen}")
        return "; ".join(parts)

    # -- main loop -------------------------------------------------------------------------
    def run(self, on_tick: Callable[[], object] | None = None) -> None:
        """Serve until SIGTERM/SIGINT; the caller ran ``start``. ``on_tick`` runs at every
        wake-up of the loop (``run_daemon``: ``HeapFreeze.again_if_imported``)."""
        tick = min(1.0, self.watchdog.interval / 4) if self.watchdog else 1.0
        last = ""
        while True:
            self.heartbeat.beat()
            if on_tick is not None:
                on_tick()
            line = self.status_line()
            if line != last:
                self.notifier.status(line)
                last = line
            got = self.signals.wait(tick)
            stop = next((s for s in got if s in STOP_SIGNALS), None)
            if stop is not None:
                log.info("%s received", signal.Signals(stop).name)
                return
            if signal.SIGHUP in got:
                self.reload()

    def reload(self) -> None:
        from vfiod.daemon.reload import apply_reload

        self.notifier.reloading()
        try:
            new = read_config(self.opts)
        except ConfigError as e:
            self.info.reload_error = str(e)
            log.error("reload refused, keeping the running configuration: %s", e)
            self.notifier.ready(f"reload refused: {e}")
            return
        self.info.restart_needed = apply_reload(self, new)
        self.info.reload_error = None
        self.config = new
        log.info("configuration reloaded from %s%s", new.source,
                 f"; restart needed for: {', '.join(self.info.restart_needed)}"
                 if self.info.restart_needed else "")
        self.notifier.ready(self.status_line())

    # -- stop ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """The stop (see the module docstring); bounded by the stop budget plus what
        closing takes."""
        self.notifier.stopping("stopping: cancelling migrations that have not committed")
        log.info("stopping")
        if self.watchdog is not None:
            # After STOPPING=1 systemd no longer expects pings; a long rollback must not
            # read as a wedged main loop.
            self.watchdog.stop()
        if self.control is not None:
            self.control.close()
        migrations = getattr(self, "migrations", None)
        if migrations is not None:
            migrations.resolution.stop()
            migrations.shutdown(self.stop_budget_s)
            self.notifier.status(f"stopping: migrations ended; {self.status_line()}")
        # Closing fds at a stop is what a crash does too (the kernel resets the devices):
        # the journal keeps each guest's state as it was, so the restart recovers it the
        # same way instead of reading "released" for every guest.
        self.registry.lifecycle.record = None
        kept: list[str] = []
        if hasattr(self, "guests"):
            kept = self.guests.close_all(migrations.ledger.holds if migrations else None)
        if hasattr(self, "journal"):
            self.journal.close()
        if self.metrics is not None:
            self.metrics.close()
        if self._sim is not None:
            if kept:
                log.warning("simulated host left up for the process exit: guest(s) %s "
                            "still held by a thread", ", ".join(kept))
            else:
                self._sim.close()
                if self._sim_root is not None and self.opts.sim_root is None:
                    shutil.rmtree(self._sim_root, ignore_errors=True)
        late = [signal.Signals(s).name for s in self.signals.drain()]
        if late:
            log.info("%s during the stop: ignored (the stop was under way)", ", ".join(late))
        self.signals.close()
        self.notifier.notify(status="stopped" + (
            f"; fds of {', '.join(kept)} left to the process exit" if kept else ""))
        self.notifier.close()
        log.info("stopped")


def open_journal(state_dir: str, registry: Registry) -> Journal:
    """The journal under the state directory; every lifecycle transition is written to it
    before it is made (docs/architecture.md §1.8)."""
    journal = Journal.open(state_dir)
    for warning in journal.state.warnings:
        log.warning("journal %s: %s", journal.path, warning)
    registry.lifecycle.record = journal.append_transition
    return journal


def make_state_dir(path: str) -> None:
    """The state directory, made 0700 (the journal says which guests run where) if
    missing; ``VfiodError`` naming it if it cannot be a directory."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:
        raise VfiodError(f"state directory {path}: it exists and is not a directory") from None
    except OSError as e:
        raise VfiodError(f"state directory {path}: {e.strerror}") from None


def _gid(group: str) -> int | None:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("control group %r does not exist: only root may use the control socket",
                    group)
        return None


class HeapFreeze:
    """Collect once, then move every object alive (modules, the guests: most of what the
    process will ever hold) out of the cyclic collector's reach: its full passes then look
    only at objects made since, and no longer stop every thread for 55-125 ms at 64 guests
    (docs/benchmarks.md §2: they were the 1% of ``status`` requests that waited 100 ms or more).

    After the start, ``again_if_imported`` freezes once more when modules were imported
    since: numba builds its typing registries (about 50,000 objects) at the first kernel
    call, which an idle daemon no longer makes (``journal_crc``), so they arrive with the
    first migration and would otherwise double every later full pass. New modules are
    rare (the first migration, a first reload), and each freeze keeps whatever else is
    alive at that moment out of the collector for good: a bounded, one-off cost."""

    def __init__(self) -> None:
        self.modules = 0

    def freeze(self, when: str) -> int:
        """Collect and freeze; returns how many objects are frozen in all."""
        gc.collect()
        gc.freeze()
        self.modules = len(sys.modules)
        frozen = gc.get_freeze_count()
        log.info("%s heap frozen: %d objects left out of later collections", when, frozen)
        return frozen

    def again_if_imported(self) -> int | None:
        """Freeze again if modules were imported since the last freeze (else None)."""
        if len(sys.modules) <= self.modules:
            return None
        return self.freeze("grown")


def freeze_startup_heap() -> HeapFreeze:
    """The first freeze, right after the start (``HeapFreeze``)."""
    heap = HeapFreeze()
    heap.freeze("start-up")
    return heap


def run_daemon(opts: RunOptions) -> int:
    """``vfiod run``: 0 after a clean stop, 1 if it could not start."""
    try:
        config = read_config(opts)
    except ConfigError as e:
        log.error("%s", e)
        return 1
    daemon = Daemon(opts, config)
    try:
        daemon.start()
    except (VfiodError, OSError) as e:
        log.error("cannot start: %s", e)
        daemon.shutdown()
        return 1
    heap = freeze_startup_heap()
    try:
        daemon.run(on_tick=heap.again_if_imported)
    finally:
        daemon.shutdown()
    return 0
