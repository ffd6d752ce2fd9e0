"""systemd units checked by systemd-analyze, the installer into a scratch root, sd_notify."""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ugrod.setup import sd_notify as systemd_notify
from ugrod.setup.systemd_install import render_unit

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("ugrod.service", "ugro-gpu-exporter.service")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    assert Path(exe).exists(), "systemd-analyze is missing: scripts/test.sh installs systemd"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.fixture
def rendered(tmp_path: Path) -> dict[str, Path]:
    """The units with @PREFIX@ pointing at a prefix whose bin/ holds real executables."""
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    for exe in ("ugrod", "ugro-gpu-exporter"):
        (prefix / "bin" / exe).symlink_to(sys.executable)
    out = {}
    for unit in UNITS:
        path = tmp_path / unit
        path.write_text(render_unit((ROOT / "systemd" / unit).read_text(), prefix))
        out[unit] = path
    return out


def service(path: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser["Service"]


@pytest.mark.parametrize("unit", UNITS)
def test_units_pass_systemd_analyze_verify(rendered: dict[str, Path], unit: str) -> None:
    result = analyze("verify", str(rendered[unit]))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize(("unit", "threshold"), [("ugrod.service", 30),
                                                 ("ugro-gpu-exporter.service", 20)])
def test_units_are_sandboxed(rendered: dict[str, Path], unit: str, threshold: int) -> None:
    """systemd's exposure score (shown 0-10, thresholds in tenths): ugrod <= 3.0 (it must
    run PyTorch ranks and probes), the exporter <= 2.0."""
    result = analyze("security", "--offline=yes", f"--threshold={threshold}",
                     str(rendered[unit]))
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr


def test_ugrod_unit_has_what_the_daemon_relies_on(rendered: dict[str, Path]) -> None:
    s = service(rendered["ugrod.service"])
    expected = {
        "Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "User": "ugro",
        "Group": "ugro", "StateDirectory": "ugro ugro-work", "RuntimeDirectory": "ugro",
        "ProtectSystem": "strict", "ProtectHome": "read-only", "NoNewPrivileges": "yes",
        "PrivateTmp": "yes", "KillMode": "process",
    }
    assert {k: s.get(k) for k in expected} == expected
    # Jobs run as their owners: exactly the two capabilities that takes (README, Security).
    assert s["CapabilityBoundingSet"] == s["AmbientCapabilities"] == "CAP_SETUID CAP_SETGID"
    assert (s["StateDirectoryMode"], s["UMask"]) == ("0700", "0077")
    assert "--state-dir /var/lib/ugro --socket /run/ugro/ugrod.sock" in s["ExecStart"]
    assert s["ExecStart"].split()[0].endswith("/prefix/bin/ugrod")
    assert "@PREFIX@" not in rendered["ugrod.service"].read_text()


def test_exporter_unit_runs_unprivileged(rendered: dict[str, Path]) -> None:
    s = service(rendered["ugro-gpu-exporter.service"])
    assert s["DynamicUser"] == "yes" and s["NoNewPrivileges"] == "yes"
    assert s["ExecStart"].endswith("--listen 0.0.0.0:9400")
    assert "PrivateDevices" not in s  # NVML needs /dev/nvidia*


def test_installer_puts_everything_in_place(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc" / "ugro").mkdir(parents=True)
    (root / "etc" / "ugro" / "cluster.yaml").write_text(
        "cluster: {name: lab}\nnodes:\n  gpu1: {host: 10.0.0.5, user: ugro, gpu_exporter: true}\n"
        "health: {thresholds: {gpu_temp_c: {warn: 70, crit: 75}}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "ugrod.setup.systemd_install", "--head", "--node", "--prometheus",
         "--grafana", "--root", str(root), "--prefix", "/opt/ugro", "--no-start"],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    unit = (root / "etc/systemd/system/ugrod.service").read_text()
    assert "ExecStart=/opt/ugro/bin/ugrod " in unit
    assert (root / "etc/systemd/system/ugro-gpu-exporter.service").is_file()
    assert (root / "opt/ugro/share/doc/ugro/operations.md").is_file()
    rules = sorted(p.name for p in (root / "etc/prometheus/ugro").glob("*.rules.yml"))
    assert rules == ["ugro-alerts.rules.yml", "ugro-recording.rules.yml"]
    prom = yaml.safe_load((root / "etc/prometheus/ugro/prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/ugro/ugro-recording.rules.yml",
                                  "/etc/prometheus/ugro/ugro-alerts.rules.yml"]
    assert prom["scrape_configs"][1]["static_configs"] == [
        {"targets": ["10.0.0.5:9400"], "labels": {"node": "gpu1"}}]
    # The alerts carry this cluster.yaml's thresholds (70 °C, not the default 80).
    alerts = (root / "etc/prometheus/ugro/ugro-alerts.rules.yml").read_text()
    assert "node_gpu:ugro_gpu_temperature_celsius:max > 70\n" in alerts
    assert (root / "etc/grafana/provisioning/datasources/ugro.yaml").is_file()
    assert (root / "etc/grafana/provisioning/dashboards/ugro.yaml").is_file()
    dashboards = sorted(p.name for p in (root / "var/lib/grafana/dashboards/ugro").iterdir())
    assert dashboards == ["cluster-overview.json", "job-detail.json", "node-detail.json"]
    provider = yaml.safe_load((root / "etc/grafana/provisioning/dashboards/ugro.yaml")
                              .read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/ugro"
    # Under --root, no user is created and systemctl is only announced.
    assert "run systemctl enable ugrod.service" in result.stdout


def test_install_sh_dry_run_says_what_it_would_do(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(ROOT / "systemd" / "install.sh"), "--head",
                             "--dry-run", "--root", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    assert f"install {tmp_path}/etc/systemd/system/ugrod.service" in result.stdout
    assert not any(tmp_path.iterdir())


def test_installer_wants_something_to_do() -> None:
    result = subprocess.run([sys.executable, "-m", "ugrod.setup.systemd_install"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "--head" in result.stderr


def test_notify_ready_reaches_the_notify_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        assert systemd_notify.notify("READY=1", "STATUS=up", env={"NOTIFY_SOCKET": str(path)})
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        os.environ["NOTIFY_SOCKET"] = str(path)
        try:
            assert systemd_notify.notify_ready("listening")
            assert sock.recv(4096) == f"READY=1\nMAINPID={os.getpid()}\nSTATUS=listening".encode()
            assert systemd_notify.notify_stopping()
            assert sock.recv(4096) == b"STOPPING=1"
        finally:
            del os.environ["NOTIFY_SOCKET"]


def test_notify_abstract_socket_and_outside_systemd() -> None:
    name = f"ugro-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert systemd_notify.notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"
    assert systemd_notify.notify("READY=1", env={}) is False
    with pytest.raises(OSError):
        systemd_notify.notify("READY=1", env={"NOTIFY_SOCKET": "relative/path"})
