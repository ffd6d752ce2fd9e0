#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run lint, types and tests.
# Used by the README and by .ci/run. Idempotent: skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need_apt+=(openssh-client)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v jq >/dev/null 2>&1 || need_apt+=(jq)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v amtool >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
command -v rsync >/dev/null 2>&1 || need_apt+=(rsync)  # bench/bench_sync.py: the baseline
# real partitions of the sshd nodes' SSH paths (tests/partition.py)
command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || need_apt+=(iptables)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# Real local users for the trust tests (tests/integration/test_trust.py): ugro-other
# submits jobs that must run as ugro-other and must not reach root's; ugro-svc runs ugrod
# as a service account with CAP_SETUID/CAP_SETGID. Idempotent.
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if ! id ugro-other >/dev/null 2>&1; then
  echo "== useradd ugro-other (a second user for the trust tests)"
  $SUDO useradd --create-home --shell /bin/sh ugro-other
fi
# No password, but not locked ('!'): sshd refuses keys for a locked account; a login
# shell and a home, even if the account was made without them: its SSH jobs run there.
$SUDO usermod -p '*' -s /bin/sh ugro-other
other_home=$(getent passwd ugro-other | cut -d: -f6)
if [ ! -d "$other_home" ]; then
  $SUDO mkdir -p "$other_home" && $SUDO chown ugro-other: "$other_home" && $SUDO chmod 0750 "$other_home"
fi
if ! id ugro-svc >/dev/null 2>&1; then
  echo "== useradd ugro-svc (a service account for the trust tests)"
  $SUDO useradd --system --no-create-home --shell /usr/sbin/nologin ugro-svc
fi

PY=${PYTHON:-python3}
echo "== pip install (the locked test set: requirements/test.lock, then ugro itself)"
# quiet unless pip fails; a failed install stops the script with pip's own output
pipq() {
  local log; log=$(mktemp)
  if ! $PY -m pip "$@" -q --disable-pip-version-check >"$log" 2>&1; then cat "$log" >&2; exit 1; fi
  rm -f "$log"
}
pipq install --require-hashes -r requirements/test.lock
echo "== npm ci + copy of the dashboard's chart library (uPlot) into the package"
bash scripts/dashboard_assets.sh
pipq install --no-deps -e .

if [ -f grafana/schema-check/package.json ]; then
  echo "== npm ci (pinned @grafana/schema for the dashboard typecheck)"
  (cd grafana/schema-check && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

# The sshd test nodes run commands through the login shell, which on a pyenv machine runs
# `pyenv rehash` from ~/.bashrc; a rehash killed half-way leaves its lock behind and every
# later SSH command then waits 60 s for it. Clear a lock that no running rehash holds.
if command -v pyenv >/dev/null 2>&1 && ! pgrep -f pyenv-rehash >/dev/null 2>&1; then
  rm -f "$(pyenv root)/shims/.pyenv-shim"
fi

echo "== ruff"
$PY -m ruff check ugrod ugroctl exporters
echo "== mypy --strict"
$PY -m mypy ugrod ugroctl exporters
echo "== lint-imports (the layers and import contracts in pyproject.toml)"
$PY -c "from importlinter.cli import lint_imports_command; lint_imports_command()" --no-logo
echo "== pytest"
$PY -m pytest -q -p no:cacheprovider "$@"
