#!/usr/bin/env bash
# Refresh the lock files from pyproject.toml's ranges. Do it on purpose, then run
# ./scripts/test.sh and commit the locks only with the suite green.
#   requirements/base.lock  ugro's own dependencies (the wheel-install test's fresh venv)
#   requirements/run.lock   what ./scripts/demo.sh installs (ugro + the CPU build of torch)
#   requirements/test.lock  what ./scripts/test.sh and .ci/run install (+ the test extras)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m uv --version >/dev/null 2>&1 || $PY -m pip install -q uv
common=(--python-version 3.11 --generate-hashes --find-links /opt/wheels --no-header)
$PY -m uv pip compile pyproject.toml "${common[@]}" -o requirements/base.lock
$PY -m uv pip compile pyproject.toml requirements/torch-cpu.in "${common[@]}" -o requirements/run.lock
$PY -m uv pip compile pyproject.toml --extra test requirements/torch-cpu.in "${common[@]}" -o requirements/test.lock
