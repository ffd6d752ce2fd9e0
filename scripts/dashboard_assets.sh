#!/usr/bin/env bash
# The dashboard's browser libraries: `npm ci` (versions pinned in package-lock.json), then
# copy the built files into the package's static/vendor/ (gitignored), so `pip install`
# and a built wheel ship them. Run by scripts/test.sh and scripts/demo.sh before pip.
set -euo pipefail
cd "$(dirname "$0")/../ugroctl/dashboard"
if ! command -v npm >/dev/null 2>&1; then
  echo "dashboard_assets.sh: npm is needed for the dashboard's chart library (apt-get install npm)" >&2
  exit 1
fi
npm ci --no-audit --no-fund --loglevel=error >/dev/null
mkdir -p static/vendor
cp node_modules/uplot/dist/uPlot.iife.min.js node_modules/uplot/dist/uPlot.min.css \
   node_modules/uplot/LICENSE static/vendor/
