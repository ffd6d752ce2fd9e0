"""`ugrod`: start the daemon, or check a config file and exit."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path


class _JournalFormatter(logging.Formatter):
    """`<N>` syslog priority prefixes under systemd (journald reads them), times otherwise."""

    LEVELS = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
              logging.CRITICAL: 2}

    def __init__(self, journald: bool) -> None:
        fmt = "%(name)s: %(message)s" if journald else \
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journald:
            prio = self.LEVELS.get(record.levelno, 6)
            return "\n".join(f"<{prio}>{line}" for line in text.splitlines())
        return text


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalFormatter(bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("asyncssh", "apscheduler", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ugrod`."""
    p = argparse.ArgumentParser(
        prog="ugrod", description="UGRO daemon: queue, launch and supervise training jobs "
        "across the cluster in cluster.yaml (or this machine alone, with no config).",
        epilog="Example: ugrod --config /etc/ugro/cluster.yaml   |   "
        "ugrod --check-config cluster.yaml")
    p.add_argument("--config", type=Path, default=os.environ.get("UGRO_CONFIG") or None,
                   help="cluster.yaml (env UGRO_CONFIG; default: /etc/ugro/cluster.yaml if it "
                   "exists, else a one-node cluster of this machine)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where the event log, snapshots and job directories live "
                   "(env UGRO_STATE_DIR)")
    p.add_argument("--socket", type=Path, default=None,
                   help="control socket path (env UGRO_SOCKET)")
    p.add_argument("--check-config", type=Path, metavar="FILE",
                   help="validate FILE and exit (non-zero with every error found)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping ranks (default 10)")
    p.add_argument("--log-level", default=os.environ.get("UGRO_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="store_true", help="print the version and exit")
    args = p.parse_args(argv)

    from ugrod import __version__
    if args.version:
        print(f"ugrod {__version__}")
        return 0
    from ugrod.config import loading
    from ugrod.config import schema as cfgmod
    if args.check_config is not None:
        try:
            cfg = loading.load(args.check_config)
            missing = loading.check_files(cfg)
            if missing:
                raise cfgmod.ConfigError(args.check_config, missing)
        except cfgmod.ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"{args.check_config}: ok ({len(cfg.nodes)} nodes)")
        return 0

    setup_logging(args.log_level)
    config_path = args.config
    from ugrod.config.paths import ROOT_CONFIG
    if config_path is None and ROOT_CONFIG.exists():
        config_path = ROOT_CONFIG
    try:
        cfg = loading.load(config_path) if config_path is not None else cfgmod.builtin()
    except cfgmod.ConfigError as exc:
        print(f"ugrod: {exc}", file=sys.stderr)
        return 1
    for line in (cfgmod.ConfigError(config_path or "", loading.check_files(cfg)).lines()
                 if config_path is not None else ()):
        logging.getLogger("ugrod").warning("%s", line)
    state_dir, socket_path = cfgmod.resolve_paths(cfg, flag_state_dir=args.state_dir,
                                                  flag_socket=args.socket, env=os.environ)
    return asyncio.run(_serve(cfg, config_path, state_dir, socket_path, args.grace))


async def _serve(cfg: object, config_path: Path | None, state_dir: Path, socket_path: Path,
                 grace: float) -> int:
    from ugrod.daemon import Daemon
    from ugrod.store.ledger import ReplayError
    from ugrod.store.log import LogError

    daemon = Daemon(cfg, config_path, state_dir, socket_path, grace_s=grace)  # type: ignore[arg-type]
    try:
        return await daemon.run()
    except (LogError, ReplayError) as exc:
        logging.getLogger("ugrod").critical("%s", exc)
        print(f"ugrod: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
