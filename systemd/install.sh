#!/usr/bin/env bash
# Install UGRO with systemd on this machine (run as root, from a UGRO checkout).
#
#   systemd/install.sh --head [--prometheus] [--grafana]   # head node: ugrod
#   systemd/install.sh --node                              # every GPU node: the GPU exporter
#
# 1. a virtual environment at $UGRO_PREFIX (default /opt/ugro) with UGRO in it
#    (re-running upgrades it in place: the same command is the upgrade);
# 2. python -m ugrod.setup.systemd_install with the same arguments: the ugro user,
#    the units (ExecStart pointing into the venv), docs, and on request the
#    Prometheus rules + scrape config and the Grafana provisioning + dashboards;
#    then systemctl daemon-reload and enable --now.
# Extra arguments (--no-start, --dry-run, --root DIR) are passed through.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${UGRO_PREFIX:-/opt/ugro}"
python="${PYTHON:-python3}"

if [ "$(id -u)" != 0 ] && [[ " $* " != *" --root "* ]] && [[ " $* " != *" --dry-run "* ]]; then
  echo "install.sh: run as root (sudo $0 $*)" >&2
  exit 1
fi
if [[ " $* " != *" --dry-run "* ]]; then
  if [ ! -x "$prefix/bin/python" ]; then
    echo "== creating $prefix"
    "$python" -m venv "$prefix"
  fi
  echo "== installing UGRO from $here into $prefix"
  "$prefix/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$here"
  if [[ " $* " == *" --node "* ]]; then
    # NVML bindings for the GPU exporter (it falls back to nvidia-smi without them).
    "$prefix/bin/python" -m pip install -q --disable-pip-version-check nvidia-ml-py || true
  fi
  exec "$prefix/bin/python" -m ugrod.setup.systemd_install --source "$here" --prefix "$prefix" "$@"
fi
exec "$python" -m ugrod.setup.systemd_install --source "$here" --prefix "$prefix" "$@"
