#!/usr/bin/env bash
# Install UGRO and run the demo on the built-in one-node cluster (this machine):
# start ugrod, train the example DDP job through ugroctl, show status, logs and results.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
echo "== installing ugro (the locked set in requirements/run.lock, with the CPU build of torch)"
# quiet unless pip fails; a failed install stops the script with pip's own output
pipq() {
  local log; log=$(mktemp)
  if ! $PY -m pip "$@" -q --disable-pip-version-check >"$log" 2>&1; then cat "$log" >&2; exit 1; fi
  rm -f "$log"
}
pipq install --require-hashes -r requirements/run.lock
# the dashboard's chart library (uPlot, pinned by package-lock.json) into the package
bash scripts/dashboard_assets.sh || echo "(no npm: \`ugroctl dashboard\` will say how to add it)"
pipq install --no-deps -e .

DEMO=${UGRO_DEMO_DIR:-$(mktemp -d /tmp/ugro-demo.XXXX)}
export UGRO_STATE_DIR=$DEMO/state UGRO_SOCKET=$DEMO/ugrod.sock
echo "== starting ugrod (state in $UGRO_STATE_DIR, socket $UGRO_SOCKET)"
ugrod --log-level warning 2>"$DEMO/ugrod.log" &
UGROD_PID=$!
trap 'kill -TERM $UGROD_PID 2>/dev/null; wait $UGROD_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$UGRO_SOCKET" ] && break; sleep 0.1; done

ugroctl nodes
echo "== submitting the example DDP job (2 processes, gloo on CPU)"
ugroctl submit --name demo --nproc-per-node 2 --torchrun -- \
  "$PWD/examples/train_ddp.py" --steps 60 --checkpoint-every 20
ugroctl status demo
ugroctl logs demo -f | tail -n 5
ugroctl status demo
ugroctl results demo
ugroctl events --job demo | tail -n 3
