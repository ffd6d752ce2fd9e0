#!/usr/bin/env bash
# Install UGRO and run the demo on the built-in one-node cluster (this machine):
# start ugrod, train the example DDP job through ugroctl, show status, logs and results.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
echo "== installing ugro (and the CPU build of torch for the example job)"
$PY -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v -E '^WARNING: (Location|Running pip)' || true
$PY -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v -E '^WARNING: (Location|Running pip)' || true

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
