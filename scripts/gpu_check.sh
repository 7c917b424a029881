#!/usr/bin/env bash
# Short checks a machine with a CUDA GPU runs (CI has none): the quantized-base tests on the GPU's own
# bitsandbytes path, then a 20-step nf4 QLoRA run on the bundled SmolLM2, and the memory estimate against
# the CUDA allocator peak of that run. Usage: bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device; nothing to check"; exit 0
fi
"$python" -m pytest -q -p no:cacheprovider tests/test_quantize.py
out=$(mktemp -d)
cat > "$out/qlora.yaml" <<YAML
model: smollm2-135m
quantize: nf4
data: {train: "builtin:chatterbot", max_train_examples: 400, max_eval_examples: 32}
retain: builtin:shakespeare
strategies:
  - lora: {rank: 8, alpha: 16, targets: all-linear}
train: {max_steps: 20, batch_size: 8, lr: 5.0e-4, max_seq_len: 128, log_every: 5}
evaluation: {retain_examples: 16, samples: 1}
output: $out/run
YAML
"$python" -m tuneforge.cli train "$out/qlora.yaml"
"$python" - "$out/run/results.json" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))
before, after = results["before"]["eval"]["loss"], results["after"]["eval"]["loss"]
print(f"gpu_check: nf4 QLoRA eval loss {before:.3f} -> {after:.3f}, peak {results['peak_memory_mb']:.0f} MiB")
assert after < before, "the nf4 QLoRA run did not lower the eval loss"
PY
# The memory estimate against the CUDA allocator's peak, on the same nf4 QLoRA run (within 25%).
"$python" -m tuneforge.cli inspect "$out/qlora.yaml" --json | tail -1 > "$out/inspect.json"
"$python" - "$out/inspect.json" "$out/run/results.json" <<'PY'
import json, sys
estimate = json.load(open(sys.argv[1]))["memory"]["total"] / 2**20
measured = json.load(open(sys.argv[2]))["peak_memory_mb"]
print(f"gpu_check: estimated peak {estimate:.0f} MiB, CUDA allocator peak {measured:.0f} MiB "
      f"({estimate / measured:.2f}x)")
assert abs(estimate - measured) <= 0.25 * measured, "the memory estimate is off by more than 25% on CUDA"
PY
