#!/usr/bin/env bash
# The main job: set up, then fine-tune the bundled SmolLM2-135M-Instruct with LoRA on the bundled
# chatterbot Q/A pairs and print task and retain (Shakespeare) metrics before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/tuneforge train examples/quickstart.yaml --overwrite "$@"
