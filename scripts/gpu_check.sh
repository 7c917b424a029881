#!/usr/bin/env bash
# Short checks a machine with a CUDA GPU runs (CI has none), under ~8 minutes: the quantized-base tests on
# the GPU's own bitsandbytes path, a 20-step nf4 QLoRA run on the bundled SmolLM2 and the memory estimate
# against its CUDA allocator peak, a bf16 LoRA run, one FSDP2 and one ZeRO-3 full fine-tuning run on the
# GPUs present (one is enough), and the LoRA bench against PEFT on the GPU. Writes one JSON summary
# (gpu_check.json, or $GPU_CHECK_JSON). Usage: bash scripts/gpu_check.sh
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

# bf16 LoRA on the bundled model, then FSDP2 and ZeRO-3 full fine-tuning on every GPU present.
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
for name in bf16-lora fsdp zero3; do
  case $name in
    bf16-lora) strategies='[{lora: {rank: 16, alpha: 32, targets: all-linear}}]'; extra='precision: bf16'
               dist='{engine: ddp}';;
    fsdp) strategies='[{full: {}}]'; extra='lr: 2.0e-5'; dist='{engine: fsdp}';;
    zero3) strategies='[{full: {}}]'; extra='lr: 2.0e-5'
           dist='{engine: deepspeed, deepspeed: {zero_optimization: {stage: 3}}}';;
  esac
  cat > "$out/$name.yaml" <<YAML
model: smollm2-135m
data: {train: "builtin:chatterbot", max_train_examples: 400, max_eval_examples: 32}
retain: builtin:shakespeare
strategies: $strategies
train: {max_steps: 20, batch_size: 8, max_seq_len: 128, log_every: 5, $extra}
evaluation: {retain_examples: 16, samples: 1}
distributed: $dist
output: $out/$name
YAML
  if [ "$name" = bf16-lora ]; then
    "$python" -m tuneforge.cli train "$out/$name.yaml"
  else
    "$python" -m torch.distributed.run --standalone --nproc_per_node "$gpus" -m tuneforge.cli train "$out/$name.yaml"
  fi
done
# The LoRA bench against PEFT on the GPU (one repeat: a check, not a published number).
"$python" bench/bench.py --suite smollm2 --methods lora-packed trainer-lora --repeats 1 --json "$out/bench.json" \
  || echo "gpu_check: the bench did not finish"
"$python" - "$out" "${GPU_CHECK_JSON:-gpu_check.json}" <<'PY'
import datetime, json, pathlib, sys, torch
out, target = pathlib.Path(sys.argv[1]), sys.argv[2]
summary = {"date": datetime.date.today().isoformat(), "command": "bash scripts/gpu_check.sh",
           "device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "runs": {}}
for name in ("run", "bf16-lora", "fsdp", "zero3"):
    path = out / name / "results.json"
    if path.is_file():
        r = json.loads(path.read_text())
        summary["runs"]["nf4-qlora" if name == "run" else name] = {
            "eval_loss": [r["before"]["eval"]["loss"], r["after"]["eval"]["loss"]],
            "forgetting": r.get("forgetting"), "tokens_per_s": r["tokens_per_s"],
            "peak_memory_mb": r["peak_memory_mb"], "distributed": r.get("distributed")}
if (out / "bench.json").is_file():
    summary["bench"] = json.loads((out / "bench.json").read_text())
pathlib.Path(target).write_text(json.dumps(summary, indent=1) + "\n")
print(f"gpu_check: summary in {target}")
missing = [n for n in ("nf4-qlora", "bf16-lora", "fsdp", "zero3") if n not in summary["runs"]]
assert not missing, f"runs without results: {missing}"
PY
