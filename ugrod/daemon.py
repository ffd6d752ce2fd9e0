"""The daemon's shell: wires config, ledger, nodes, executor, planner, API and periodic jobs."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ugrod import __version__
from ugrod.api import admission, trust
from ugrod.api import app as api_app
from ugrod.config import loading
from ugrod.config import schema as cfgmod
from ugrod.control import Control
from ugrod.core import events as ev
from ugrod.core.commands import Refused
from ugrod.core.state import (
    ACTIVE,
    Job,
)
from ugrod.loops.checkpoints import CopySettings
from ugrod.loops.executor import Executor
from ugrod.loops.exits import Exits
from ugrod.loops.planning import Planning
from ugrod.loops.progress import Progress
from ugrod.loops.schedule import Schedule
from ugrod.loops.upkeep import Upkeep
from ugrod.metrics.runtime_stats import RuntimeStats
from ugrod.nodes import codesync
from ugrod.nodes.fleet import Fleet
from ugrod.store.ledger import Ledger
from ugrod.views import Views

logger = logging.getLogger("ugrod")


class Daemon:
    """One running ugrod."""

    def __init__(self, config: cfgmod.Config, config_path: Path | None, state_dir: Path,
                 socket_path: Path, *, grace_s: float = 10.0,
                 log_options: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.state_dir = state_dir
        self.socket_path = socket_path
        self.grace_s = grace_s
        self._log_options = dict(log_options or {})  # tests inject a failing fdatasync here
        self.policy = trust.Policy(trust.detect_mode(), admin_group=config.cluster.admin_group)
        self.stats = RuntimeStats()
        self.ledger: Ledger = None  # type: ignore[assignment]  # set in start()
        self.executor: Executor = None  # type: ignore[assignment]
        self.fleet: Fleet = None  # type: ignore[assignment]
        self.planning: Planning = None  # type: ignore[assignment]
        self.progress: Progress = None  # type: ignore[assignment]  # each job's progress
        self.exits: Exits = None  # type: ignore[assignment]  # rank ends, to supervision
        self.monitor: Any = None
        self.watchdog: Any = None
        self.fencer: Any = None
        self._listener: api_app.Listener | None = None  # the control socket
        self.admission: admission.Admission | None = None  # the control socket's limits
        self._metrics_runner: Any = None
        self._scheduler: Schedule | None = None
        self._stopped = asyncio.Event()
        self.closing = asyncio.Event()  # set when stopping: streams and waits end at once
        self._exit_code = 0
        self.control: Control = Control(self)  # client commands: the one door
        self.views: Views = Views(self)  # client reads: queue, why, results, sweeps
        self.code_store = codesync.HeadStore(state_dir / "sync")

    # ---- life cycle ------------------------------------------------------------

    async def start(self) -> None:
        """Recover state, reconcile nodes with the config, re-attach jobs, then listen."""
        t0 = time.perf_counter()
        # Everything ugrod writes is its own (0600/0700): the event log and the central
        # job dirs hold other users' secrets, which only the API shows, to their owners.
        os.umask(0o077)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state_dir, 0o700)
        logger.info("trust: %s mode (%s)", self.policy.mode, {
            trust.Mode.ROOT: "jobs run as their owners",
            trust.Mode.SERVICE: "CAP_SETUID/CAP_SETGID: jobs run as their owners",
            trust.Mode.DEVELOPMENT: "jobs run as ugrod's user, who alone may use the socket",
        }[self.policy.mode])
        self.ledger = await asyncio.to_thread(
            functools.partial(Ledger.open, self.state_dir, on_batch=self._on_batch,
                              **self._log_options))
        self.ledger.on_failure = self.fatal
        self.stats.replay_done(self.ledger.replay_s, self.ledger.replayed)
        rec = self.ledger.log.recovery
        if rec.truncated_bytes:
            logger.warning("event log: cut a torn tail of %d bytes, kept in %s",
                           rec.truncated_bytes, rec.broken_file)
            self.stats.log_repaired()
        logger.info("state: seq %d (%d events replayed in %.3f s)", self.ledger.state.seq,
                    self.ledger.replayed, self.ledger.replay_s)
        self.views.remember_ended(self.ledger.state)
        self.fleet = Fleet(self.ledger, self.config, self.state_dir,
                           switches_users=self.policy.switches_users)
        self.planning = Planning(self.ledger, self.fleet, lambda: self.config.scheduler,
                                 self.stats)
        self.stats.rebuild(self.ledger.state)
        self.ledger.on_commit(self.stats.jobs_committed)
        results = self.config.paths.results
        self.progress = Progress(self.ledger)
        self.exits = Exits(self.ledger)
        self.executor = Executor(self.ledger, self.fleet, results or self.state_dir / "jobs",
                                 grace_s=self.grace_s,
                                 network_interface=self.config.cluster.network_interface,
                                 on_job_end=self.views.job_ended, code_store=self.code_store,
                                 progress=self.progress, exits=self.exits,
                                 run_as=self._run_as, timestamped_dirs=results is not None,
                                 on_metric_dropped=self.stats.metric_lines_dropped.inc,
                                 copy_settings=copy_settings(self.config.checkpoints),
                                 stats=self.stats)
        await self.ledger.record(ev.DAEMON, ev.DaemonStarted(version=__version__))
        await self.fleet.reconcile(self.config)
        # The socket must answer within a second whatever the nodes do: inventory gets a
        # moment and goes on in the background for the slow and the unreachable.
        t_nodes = time.perf_counter()
        await self.fleet.first_inventory()
        node_wait_s = time.perf_counter() - t_nodes
        self._start_monitor()  # (the fencer too: an attempt reattached may end at once)
        self.executor.reattach()
        self.executor.checkpoints.reattach()
        await self._listen()
        self._start_scheduler()
        self.planning.start()
        self._notify_ready()
        logger.info("ugrod %s ready on %s in %.2f s (%d nodes; %.2f s of it waiting for their "
                    "inventory)", __version__, self.socket_path, time.perf_counter() - t0,
                    len(self.ledger.state.nodes), node_wait_s)

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop cleanly; the exit code."""
        loop = asyncio.get_running_loop()
        await self.start()
        loop.add_signal_handler(signal.SIGTERM, self._stopped.set)
        loop.add_signal_handler(signal.SIGINT, self._stopped.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload_logged()))
        await self._stopped.wait()
        await self.stop()
        return self._exit_code

    def fatal(self, exc: BaseException) -> None:
        """The event log failed: stop acknowledging and exit non-zero (restart recovers)."""
        if self._exit_code == 0:
            logger.critical("event log write failed, stopping: %s", exc)
            self._exit_code = 1
        self._stopped.set()

    async def stop(self) -> None:
        """Stop accepting, finish in-flight commands, snapshot, release the log."""
        logger.info("stopping")
        # Followers (events -f, logs -f, submit --wait) end now, cleanly, rather than
        # being cut off by the runner's shutdown timeout.
        self.closing.set()
        if self.ledger is not None:
            self.ledger.end_streams()
        if self._listener is not None:
            await self._listener.close()
        if self._metrics_runner is not None:
            with contextlib.suppress(Exception):
                await self._metrics_runner.cleanup()
        if self._scheduler is not None:
            self._scheduler.stop()
        if self.fleet is not None:
            await self.fleet.stop_tasks()
        if self.planning is not None:
            await self.planning.stop()
        if self.watchdog is not None:
            await self.watchdog.close()
        if self.fencer is not None:
            await self.fencer.close()
        if self.monitor is not None:
            await self.monitor.close()
        await self.executor.checkpoints.close()
        await self.executor.close()
        if self.ledger.failed is None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.ledger.snapshot)
        with contextlib.suppress(Exception):
            await self.ledger.close()
        if self.fleet is not None:
            await self.fleet.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def _listen(self) -> None:
        path = self.socket_path
        group = self._socket_gid()
        if not path.parent.exists():
            # Other users must reach the socket when jobs run as their owners; in
            # development mode nobody else may.
            path.parent.mkdir(parents=True, exist_ok=True,
                              mode=0o755 if self.policy.switches_users else 0o700)
            os.chmod(path.parent, 0o755 if self.policy.switches_users else 0o700)
        if path.exists() or path.is_symlink():
            if _socket_alive(path):
                raise SystemExit(f"ugrod: another ugrod answers on {path}")
            path.unlink()
        api = self.config.api
        fd_limit = admission.raise_fd_limit()
        self.admission = admission.Admission(
            max_total=admission.connection_budget(fd_limit, api.max_connections),
            per_user=api.max_connections_per_user)
        logger.info("control socket: at most %d connections (%d per user; descriptor limit "
                    "%d), idle ones closed after %g s", self.admission.max_total,
                    self.admission.per_user, fd_limit, api.idle_timeout_s)
        self._listener = await api_app.listen(self, path, self.admission,
                                              max_body_bytes=api.max_body_bytes,
                                              idle_timeout_s=api.idle_timeout_s)
        if group is not None:
            try:
                os.chown(path, -1, group)
            except PermissionError:
                raise SystemExit(
                    f"ugrod: cannot give {path} to group {self.config.cluster.socket_group}: "
                    f"ugrod's account must be a member of it (systemd: "
                    f"SupplementaryGroups={self.config.cluster.socket_group})") from None
        os.chmod(path, 0o660)
        m = self.config.metrics
        if m.enabled:
            try:
                from ugrod.metrics import collector as metrics_mod
                collector = metrics_mod.UgroCollector(
                    lambda: self.ledger.state, self._samples, self.progress.all_latest,
                    self.stats, get_scores=self._scores, version=__version__)
                self._metrics_runner = await metrics_mod.start_metrics_server(
                    m.host, m.port, collector)
                self.metrics_port = metrics_mod.bound_port(self._metrics_runner)
            except OSError as exc:
                logger.error("metrics listener on %s:%d failed: %s", m.host, m.port, exc)

    metrics_port: int | None = None

    def _socket_gid(self) -> int | None:
        """cluster.socket_group's gid (who may connect); None: ugrod's own group."""
        name = self.config.cluster.socket_group
        if name is None:
            return None
        import grp
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            raise SystemExit(f"ugrod: cluster.socket_group: no group named {name!r} on this "
                             f"machine (see `getent group`)") from None

    def _run_as(self, job: Job, node: str) -> Mapping[str, Any] | None:
        """The account a rank of ``job`` runs as on ``node`` (None: the wrapper's own).

        On the head node, when ugrod may switch users, that is the job's owner (never
        root for someone else); on SSH nodes it is the login the node's agent uses.
        """
        from ugrod.loops.launch import LaunchError
        spec = self.ledger.state.nodes[node].spec
        if spec.transport != "local" and self.policy.switches_users and job.uid != 0:
            account = self.config.remote_account(job.owner, node)
            login = account.user if account is not None else spec.user
            if login == "root":
                raise LaunchError(
                    f"node {node}: {job.owner}'s job would run as root there (nodes.{node}."
                    f"user is root); map {job.owner} to an account of their own under "
                    f"users: in cluster.yaml, or make the node's shared user unprivileged")
            return None
        if spec.transport != "local" or not self.policy.switches_users:
            return None
        if job.uid is None:
            raise LaunchError(f"job {job.id} has no owner uid (submitted before ugrod "
                              f"recorded one): resubmit it")
        if job.uid == os.geteuid():
            return None
        try:
            return trust.account(job.uid).run_as()
        except trust.NoSuchUser as exc:
            raise LaunchError(f"cannot run job {job.id} as its owner {job.owner}: {exc}") \
                from None

    def _on_batch(self, n_events: int, n_bytes: int, fsync_s: float) -> None:
        # Called from the log's writer thread: plain counter updates only.
        self.stats.log_batch(n_events, n_bytes, fsync_s)

    def _samples(self) -> Mapping[str, Any]:
        return self.monitor.latest_samples() if self.monitor is not None else {}

    def _scores(self) -> Mapping[str, float | None]:
        return self.monitor.latest_scores() if self.monitor is not None else {}

    def _notify_ready(self) -> None:
        with contextlib.suppress(ImportError, OSError):
            from ugrod.setup.sd_notify import notify_ready
            notify_ready()

    def _start_scheduler(self) -> None:
        sched = Schedule()
        Upkeep(self.ledger, self.state_dir, self.stats).schedule(sched)  # snapshots, audit
        sched.every("planner-safety-net", self.config.scheduler.interval_s, self.kick)
        if self.monitor is not None:
            self.monitor.schedule(sched)
            from ugrod.loops.watchdog import Watchdog  # stalls, vanished ranks, dead nodes
            self.watchdog = Watchdog(
                self.ledger, self.exits, self.progress, self.monitor, self.fleet, self.fencer,
                self.executor.job_dir,
                tolerance_s=lambda: self.config.health.unreachable_tolerance_s)
            self.watchdog.schedule(sched)
            self.fencer.schedule(sched)
        sched.start()
        self._scheduler = sched

    # ---- nodes -------------------------------------------------------------------

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the config: add and remove nodes; running jobs are untouched."""
        if self.config_path is None:
            raise Refused("conflict", "ugrod runs the built-in one-node cluster (no config "
                          "file): nothing to reload")
        try:
            new = await asyncio.to_thread(loading.load, self.config_path)
        except cfgmod.ConfigError as exc:
            raise Refused("bad_request", f"config not reloaded: {exc}") from None
        changes = await self.fleet.reconcile(new)
        self.config = new
        self.policy = trust.Policy(self.policy.mode, admin_group=new.cluster.admin_group)
        await self.fleet.reconfigure(new, changes)
        self.executor.checkpoints.settings = copy_settings(new.checkpoints)
        self.kick()
        logger.info("config reloaded: %s", changes)
        return changes

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except Refused as exc:
            logger.error("reload refused: %s", exc.message)

    def _start_monitor(self) -> None:
        try:
            from ugrod.loops.monitor import Monitor
        except ImportError:
            return
        self.monitor = Monitor(self, self.fleet.agents, self.fleet.transports,
                               agent_for=self.fleet.agent_for,
                               job_dir=self.executor.job_dir)
        self.fleet.health = self.monitor
        # Nodes that may run an ended attempt are drained until cleared (loops/fencing.py).
        from ugrod.loops.fencing import Fencer
        self.fencer = Fencer(self.ledger, self.fleet, self.monitor, self.executor.job_dir,
                             on_metric=self.executor.backfilled_metric)
        self.executor.fence = self.fencer.fence
        self.monitor.on_answer = self.fencer.answered

    # ---- planning ------------------------------------------------------------------

    def kick(self) -> None:
        """Ask for a planner round soon (coalesced)."""
        self.planning.kick()


def copy_settings(c: cfgmod.CheckpointsConfig) -> CopySettings:
    """The ``checkpoints:`` section as the copier takes it."""
    return CopySettings(copy=c.copy, keep=c.keep, rate_bytes_s=c.max_mb_s * 1e6,
                        floor_bytes=int(c.min_free_gb * 1e9), interval_s=c.interval_s,
                        stage=c.stage)


def _socket_alive(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


_ = ACTIVE
