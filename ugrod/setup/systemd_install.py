"""Install UGRO's systemd units, Prometheus rules and Grafana dashboards (``systemd/install.sh``).

    python3 -m ugrod.setup.systemd_install --head [--prometheus] [--grafana]   # the head node
    python3 -m ugrod.setup.systemd_install --node                              # a GPU node

Files come from a checkout of the repository (``--source``, default: the one
this module lives in); ``@PREFIX@`` in the units becomes ``--prefix`` (where
``systemd/install.sh`` made the virtual environment). ``--root DIR`` installs
under DIR instead of / and touches no user, no systemctl: packaging and tests
use it. Every step says what it did; nothing that exists is overwritten except
UGRO's own files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_PREFIX = Path("/opt/ugro")
SOURCE = Path(__file__).resolve().parents[2]
USER = "ugro"
UNITS_DIR = Path("etc/systemd/system")
PROM_DIR = Path("etc/prometheus/ugro")
GRAFANA_PROVISIONING = Path("etc/grafana/provisioning")
GRAFANA_DASHBOARDS = Path("var/lib/grafana/dashboards/ugro")
CLUSTER_CONFIG = Path("etc/ugro/cluster.yaml")
DOCS = ("operations.md", "metrics.md")


class InstallError(Exception):
    """Something the installer cannot do; the message says what to fix."""


def render_unit(text: str, prefix: Path) -> str:
    """A unit file with ``@PREFIX@`` filled in."""
    return text.replace("@PREFIX@", str(prefix).rstrip("/") or "/")


class Installer:
    def __init__(self, source: Path, root: Path, prefix: Path, *, dry_run: bool = False,
                 say: Callable[[str], None] = print) -> None:
        self.source = source
        self.root = root
        self.prefix = prefix
        self.dry_run = dry_run
        self.say = say
        self.live = root == Path("/")

    def _dest(self, rel: Path) -> Path:
        return self.root / rel

    def _write(self, rel: Path, data: bytes, mode: int = 0o644) -> None:
        dest = self._dest(rel)
        self.say(f"install {dest}")
        if self.dry_run:
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".ugro-tmp")
        tmp.write_bytes(data)
        tmp.chmod(mode)
        os.replace(tmp, dest)

    def _copy(self, src: Path, rel: Path, mode: int = 0o644) -> None:
        if not src.is_file():
            raise InstallError(f"{src} is missing: is --source a UGRO checkout?")
        self._write(rel, src.read_bytes(), mode)

    def _run(self, argv: Sequence[str]) -> None:
        self.say("run " + " ".join(argv))
        if self.dry_run or not self.live:
            return
        result = subprocess.run(list(argv), check=False)
        if result.returncode != 0:
            raise InstallError(f"{' '.join(argv)} failed with exit code {result.returncode}")

    # ---- pieces ------------------------------------------------------------------

    def unit(self, name: str) -> None:
        text = (self.source / "systemd" / name).read_text()
        self._write(UNITS_DIR / name, render_unit(text, self.prefix).encode())

    def docs(self) -> None:
        rel = Path(str(self.prefix).lstrip("/")) / "share" / "doc" / "ugro"
        for doc in DOCS:
            self._copy(self.source / "docs" / doc, rel / doc)

    def user(self) -> None:
        if not self.live:
            return
        import pwd

        try:
            pwd.getpwnam(USER)
            self.say(f"user {USER} exists")
            return
        except KeyError:
            pass
        self._run(["useradd", "--system", "--user-group", "--home-dir", "/var/lib/ugro",
                   "--no-create-home", "--shell", "/usr/sbin/nologin", USER])

    def prometheus(self) -> None:
        from ugrod.config import loading
        from ugrod.config import schema as config
        from ugrod.setup.prometheus_config import rule_files, scrape_config

        cluster = self._dest(CLUSTER_CONFIG)
        cfg = loading.load(cluster) if cluster.is_file() else config.builtin()
        # The rules carry this cluster.yaml's health.thresholds (ugroctl prometheus-config
        # --rules-out writes the same files).
        for name, text in rule_files(cfg).items():
            self._write(PROM_DIR / name, text.encode())
        self._write(PROM_DIR / "prometheus.yml",
                    scrape_config(cfg, rules_dir="/" + str(PROM_DIR)).encode())
        self.say(f"Prometheus: make {'/' / PROM_DIR / 'prometheus.yml'} its config (or merge "
                 f"its scrape_configs and rule_files into /etc/prometheus/prometheus.yml), "
                 f"then `systemctl reload prometheus`")

    def grafana(self) -> None:
        prov = self.source / "grafana" / "provisioning"
        self._copy(prov / "datasources" / "ugro.yaml",
                   GRAFANA_PROVISIONING / "datasources" / "ugro.yaml")
        self._copy(prov / "dashboards" / "ugro.yaml",
                   GRAFANA_PROVISIONING / "dashboards" / "ugro.yaml")
        for dash in sorted((self.source / "grafana" / "dashboards").glob("*.json")):
            self._copy(dash, GRAFANA_DASHBOARDS / dash.name)
        self.say("Grafana: `systemctl restart grafana-server` to load the UGRO folder")

    def enable(self, unit: str, start: bool) -> None:
        self._run(["systemctl", "daemon-reload"])
        self._run(["systemctl", "enable", *(["--now"] if start else []), unit])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m ugrod.setup.systemd_install",
                                description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--head", action="store_true", help="install ugrod.service (head node)")
    p.add_argument("--node", action="store_true",
                   help="install ugro-gpu-exporter.service (every GPU node)")
    p.add_argument("--prometheus", action="store_true",
                   help="install alert/recording rules and a scrape config under "
                        "/etc/prometheus/ugro")
    p.add_argument("--grafana", action="store_true",
                   help="install Grafana provisioning and the dashboards")
    p.add_argument("--prefix", type=Path, default=DEFAULT_PREFIX,
                   help=f"where ugrod is installed (its bin/), default {DEFAULT_PREFIX}")
    p.add_argument("--root", type=Path, default=Path("/"),
                   help="install under this directory (no useradd, no systemctl)")
    p.add_argument("--source", type=Path, default=SOURCE, help="a UGRO checkout")
    p.add_argument("--no-start", action="store_true", help="enable the units, do not start")
    p.add_argument("--dry-run", action="store_true", help="say what would be done")
    args = p.parse_args(argv)
    if not (args.head or args.node or args.prometheus or args.grafana):
        p.error("say what to install: --head, --node, --prometheus and/or --grafana")
    inst = Installer(args.source, args.root, args.prefix, dry_run=args.dry_run)
    try:
        if inst.live and not args.dry_run and os.geteuid() != 0:
            raise InstallError("run as root (or use --root DIR / --dry-run)")
        if args.head or args.node:
            inst.docs()
        if args.head:
            inst.user()
            inst.unit("ugrod.service")
        if args.node:
            inst.unit("ugro-gpu-exporter.service")
        if args.prometheus:
            inst.prometheus()
        if args.grafana:
            inst.grafana()
        if args.head:
            inst.enable("ugrod.service", not args.no_start)
        if args.node:
            inst.enable("ugro-gpu-exporter.service", not args.no_start)
    except (InstallError, OSError) as exc:
        print(f"install: {exc}", file=sys.stderr)
        return 1
    if args.head and not shutil.which("ugroctl"):
        inst.say(f"add {args.prefix}/bin to PATH (or link {args.prefix}/bin/ugroctl into "
                 f"/usr/local/bin); users in group {USER} may use /run/ugro/ugrod.sock")
    return 0


if __name__ == "__main__":
    sys.exit(main())
