"""The import contracts in pyproject.toml ([tool.importlinter]) hold, and can fail.

``lint-imports`` (import-linter) checks them; docs/architecture.md says why the layers
are in that order. A broken contract is shown to fail by running the same check on a
copy of the code with one offending import added.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ugrod", "ugroctl", "exporters")
# core may use these besides the standard library (pyproject.toml says why each is there)
CORE_EXTRAS = {"msgspec", "immutables"}


def lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the code and pyproject.toml under ``root`` (no cache)."""
    argv = [sys.executable, "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache", "--no-logo"]
    for c in contracts:
        argv += ["--contract", c]
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}
    return subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=60)


def contracts() -> dict[str, dict[str, Any]]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def test_every_contract_is_kept() -> None:
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"Contracts: {len(contracts())} kept, 0 broken." in run.stdout


# (contract, module to edit, offending line, the import the report must name)
OFFENCES = [
    ("layers", "ugrod/store/reports.py", "import ugrod.loops.monitor",
     "ugrod.store.reports -> ugrod.loops.monitor"),
    ("layers", "ugrod/config/paths.py", "from ugrod.nodes import codesync",
     "ugrod.config.paths -> ugrod.nodes.codesync"),
    ("planner", "ugrod/core/planner/words.py", "from ugrod.core.planner import view",
     "ugrod.core.planner.words -> ugrod.core.planner.view"),
    ("core-pure", "ugrod/core/names.py", "from ugrod.config import paths",
     "ugrod.core.names -> ugrod.config.paths"),
    ("core-pure", "ugrod/core/vram.py", "import yaml", "ugrod.core.vram -> yaml"),
    ("core-no-io", "ugrod/core/why.py", "import time", "ugrod.core.why -> time"),
    ("remote-standalone", "ugrod/nodes/remote/rank_wrapper.py", "import msgspec",
     "ugrod.nodes.remote.rank_wrapper -> msgspec"),
    ("ugroctl-client", "ugroctl/render.py", "import ugrod.daemon",
     "ugroctl.render -> ugrod.daemon"),
    ("exporters-standalone", "exporters/ugro_metrics.py", "import ugrod.core.names",
     "exporters.ugro_metrics -> ugrod.core.names"),
    ("asyncssh", "ugrod/loops/monitor.py", "import asyncssh", "ugrod.loops.monitor -> asyncssh"),
    ("apscheduler", "ugrod/api/trust.py", "import apscheduler", "ugrod.api.trust -> apscheduler"),
    ("prometheus-client", "ugrod/store/ledger.py", "import prometheus_client",
     "ugrod.store.ledger -> prometheus_client"),
    ("aiohttp", "ugrod/metrics/families.py", "import aiohttp",
     "ugrod.metrics.families -> aiohttp"),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the packages and pyproject.toml, each test edits a copy of this."""
    root = tmp_path_factory.mktemp("arch")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, root / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "node_modules", "static"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_offences_cover_every_contract() -> None:
    assert {c for c, *_ in OFFENCES} == set(contracts())


@pytest.mark.parametrize(("contract", "module", "line", "named"), OFFENCES,
                         ids=[f"{c}:{m}" for c, m, *_ in OFFENCES])
def test_an_offending_import_breaks_its_contract(pristine: Path, tmp_path: Path, contract: str,
                                                 module: str, line: str, named: str) -> None:
    root = tmp_path / "code"
    shutil.copytree(pristine, root)
    with open(root / module, "a") as f:
        f.write(f"\n{line}  # noqa\n")
    run = lint_imports(root, contract)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "Contracts: 0 kept, 1 broken." in out, out
    assert named in out, out


def third_party_imports() -> set[str]:
    """Top-level names our code imports that are neither ours nor the standard library."""
    graph = grimp.build_graph(*PACKAGES, include_external_packages=True, cache_dir=None)
    ours = {p.stem for p in (ROOT / "exporters").glob("*.py")}  # also importable when copied
    return {m for m in graph.modules
            if m.split(".")[0] not in PACKAGES and m not in sys.stdlib_module_names
            and m not in ours}


def test_the_pure_contracts_name_every_third_party_module() -> None:
    """A forbidden list misses a new dependency unless it is added: so every third-party
    module any of our code imports is named (core may use only msgspec and immutables)."""
    found = third_party_imports()
    assert found >= CORE_EXTRAS | {"aiohttp", "asyncssh", "yaml"}  # the graph sees them
    c = contracts()
    assert found - CORE_EXTRAS <= set(c["core-pure"]["forbidden_modules"])
    assert found <= set(c["remote-standalone"]["forbidden_modules"])
