"""A user's install: the built wheel in a fresh virtual environment outside the source tree.

The editable install the suite runs on hides what a wheel forgets (package data, the node
programs shipped as text, entry points). This builds the wheel, installs it with the locked
dependencies into a new venv under /tmp, and uses only that venv's ``ugrod`` and ``ugroctl``,
from a directory that is not the checkout, with no PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("UGRO_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), str(ROOT)], check=True, cwd=base,
                   env=_clean_env(), capture_output=True)
    wheels = list(dist.glob("ugro-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check"]
    subprocess.run([*pip, "--require-hashes", "-r", str(ROOT / "requirements" / "base.lock")],
                   check=True, cwd=base, env=_clean_env(), capture_output=True)
    subprocess.run([*pip, "--no-deps", str(wheels[0])], check=True, cwd=base, env=_clean_env(),
                   capture_output=True)
    yield env_dir


def test_wheel_installs_and_runs_a_job_from_a_fresh_venv(venv: Path, short_tmp: Path) -> None:
    bin_dir = venv / "bin"
    env = _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}",
                     UGRO_STATE_DIR=str(short_tmp / "state"), UGRO_SOCKET=str(short_tmp / "s"))
    work = short_tmp / "proj"
    work.mkdir()
    # the venv's own package, not the checkout's
    where = subprocess.run([str(bin_dir / "python"), "-c", "import ugrod; print(ugrod.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(venv)), where.stdout

    version = subprocess.run([str(bin_dir / "ugrod"), "--version"], cwd=work, env=env,
                             capture_output=True, text=True, check=True)
    assert version.stdout.startswith("ugrod "), version.stdout
    helptext = subprocess.run([str(bin_dir / "ugroctl"), "--help"], cwd=work, env=env,
                              capture_output=True, text=True, check=True)
    assert "submit" in helptext.stdout and "status" in helptext.stdout
    # the dashboard's page and its chart library (copied from npm before the build) ship
    code = "import ugroctl.dashboard.server as s; print(sorted(s.static_files()))"
    static = subprocess.run([str(bin_dir / "python"), "-c", code], cwd=work, env=env,
                            capture_output=True, text=True, check=True)
    assert "vendor/uPlot.iife.min.js" in static.stdout and "app.js" in static.stdout, static

    (work / "job.py").write_text("import os\nprint('hello from', os.environ['UGRO_JOB_ID'])\n")
    stderr = short_tmp / "ugrod.stderr"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen([str(bin_dir / "ugrod"), "--log-level", "info"], cwd=work,
                                env=env, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while not (short_tmp / "s").exists():
            assert proc.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.05)
        ctl = [str(bin_dir / "ugroctl")]
        subprocess.run([*ctl, "submit", "--name", "wheeljob", "--wait", "--",
                        "python3", str(work / "job.py")],
                       cwd=work, env=env, capture_output=True, text=True, timeout=120)
        status = subprocess.run([*ctl, "--json", "status", "wheeljob"], cwd=work, env=env,
                                capture_output=True, text=True, check=True, timeout=30)
        job = json.loads(status.stdout)
        job = job.get("job", job)
        assert job["state"] == "succeeded", status.stdout
        logs = subprocess.run([*ctl, "logs", "wheeljob"], cwd=work, env=env,
                              capture_output=True, text=True, check=True, timeout=30)
        assert "hello from wheeljob" in logs.stdout
    finally:
        proc.terminate()
        proc.wait(30)
    # ugrod starts (and stops) without a single Python warning
    text = stderr.read_text()
    assert "Warning" not in text, text
