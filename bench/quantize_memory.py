"""Memory and speed of a LoRA run on the bundled SmolLM2-135M with `quantize: none | int8 | nf4 | gguf`.

Each mode trains in its own process (peak RSS is per process), on one thread, through
`tuneforge.run.train_run` (the whole run: evaluation before and after included). Writes
docs/results/DATE-quantize-memory.json; `--render FILE.json` prints the tables of docs/memory.md from it.

    HF_HUB_OFFLINE=1 python bench/quantize_memory.py --steps 20
    python bench/quantize_memory.py --render docs/results/DATE-quantize-memory.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("none", "int8", "nf4", "gguf")
BITS = {"nf4": 4.5, "fp4": 4.5, "int8": 8.0, "Q4_0": 4.5, "Q4_1": 5.0, "Q8_0": 8.5}  # with their scales


def one_run(mode: str, steps: int, output: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from tuneforge.config import validate_config
    from tuneforge.run import train_run

    config = validate_config({
        "model": "smollm2-135m", "quantize": mode,
        "data": {"train": "builtin:chatterbot", "max_train_examples": 400, "max_eval_examples": 32},
        "retain": "builtin:shakespeare",
        "strategies": [{"lora": {"rank": 8, "alpha": 16, "targets": "all-linear"}}],
        "train": {"max_steps": steps, "batch_size": 4, "lr": 5e-4, "max_seq_len": 64, "log_every": 5,
                  "seed": 0},
        "evaluation": {"retain_examples": 16, "samples": 0},
        "output": output,
    })
    results = train_run(config, overwrite=True)
    peak = results["peak_memory_mb"]  # read before anything else loads
    from tuneforge.models import load_model
    from tuneforge.quantize import base_weight_bytes

    model, _, _ = load_model("smollm2-135m", quantize=mode)
    return {"mode": mode, "peak_rss_mb": peak, "base_weights": base_weight_bytes(model),
            "steps": results["steps"], "train_seconds": results["train_seconds"],
            "step_seconds": results["train_seconds"] / max(results["steps"], 1),
            "eval_loss_before": results["before"]["eval"]["loss"],
            "eval_loss_after": results["after"]["eval"]["loss"],
            "retain_before": results["before"].get("retain", {}),
            "retain_after": results["after"].get("retain", {})}


def render(path: Path) -> str:
    data = json.loads(path.read_text())
    runs = {run["mode"]: run for run in data["runs"]}
    dense = runs["none"]
    lines = [(f"Measured {data['date']} with `{data['command']}` ({data['threads']} thread, fp32, "
              f"{dense['steps']} steps of 4 x 64 tokens, 1 run each)."), "",
             ("| quantize | base weights (MiB) | x fp32 | quantized layers: x fp32 "
              "| bits/weight (arithmetic) | peak RSS (MiB) | x none | s/step | x none "
              "| eval loss before -> after | retain ppl after |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode in MODES:
        run = runs[mode]
        held = run["base_weights"]
        packed = {k: v for k, v in held["by_kind"].items() if k != "float32"}
        bits = "-" if not packed else ", ".join(
            f"{k}: {8 * v['bytes'] / v['weights']:.2f} ({BITS.get(k, '?')})" for k, v in packed.items())
        layers = "-" if not packed else \
            f"{sum(v['bytes'] for v in packed.values()) / sum(4 * v['weights'] for v in packed.values()):.3f}"
        lines.append(
            f"| {mode} | {held['bytes'] / 2**20:.1f} | {held['bytes'] / held['fp32_bytes']:.2f} | {layers} "
            f"| {bits} "
            f"| {run['peak_rss_mb']:.0f} | {run['peak_rss_mb'] / dense['peak_rss_mb']:.2f} "
            f"| {run['step_seconds']:.2f} | {run['step_seconds'] / dense['step_seconds']:.2f} "
            f"| {run['eval_loss_before']:.3f} -> {run['eval_loss_after']:.3f} "
            f"| {run['retain_after'].get('perplexity', float('nan')):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one")
    parser.add_argument("--output")
    parser.add_argument("--render")
    args = parser.parse_args()
    if args.render:
        print(render(Path(args.render)))
        return
    if args.one:
        print("RESULT " + json.dumps(one_run(args.one, args.steps, args.output)))
        return
    runs = []
    for mode in MODES:
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([sys.executable, __file__, "--one", mode, "--steps", str(args.steps),
                                   "--output", str(Path(tmp) / "run")], capture_output=True, text=True,
                                  check=False)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(line[-1][7:]))
        print(mode, runs[-1]["peak_rss_mb"], runs[-1]["step_seconds"], flush=True)
    date = datetime.date.today().isoformat()
    out = Path(__file__).resolve().parent.parent / "docs" / "results" / f"{date}-quantize-memory.json"
    command = f"HF_HUB_OFFLINE=1 python bench/quantize_memory.py --steps {args.steps}"
    record = {"date": date, "command": command, "threads": 1, "runs": runs}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(render(out))


if __name__ == "__main__":
    main()
