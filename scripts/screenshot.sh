#!/usr/bin/env bash
# Screenshot an HTML report with headless chromium (Debian: `apt-get install chromium`); no network needed.
#   bash scripts/screenshot.sh docs/compare/report.html docs/compare/report.png [WIDTH,HEIGHT]
set -euo pipefail
page=$(realpath "$1")
out=$2
size=${3:-1280,2200}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
  --disable-sync --no-first-run --user-data-dir="$profile" --screenshot="$out" --window-size="$size" \
  "file://$page"
