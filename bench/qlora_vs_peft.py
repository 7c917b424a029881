"""QLoRA side by side: tuneforge (`quantize: nf4` + lora) vs PEFT + transformers' BitsAndBytesConfig(nf4).

Same model (the bundled SmolLM2-135M), same batches (chatterbot pairs, tokenized once), same LoRA (rank 8,
alpha 16, every block linear), same optimizer and steps, fp32, one thread. Each side runs in its own process
(peak RSS is per process); loss per token is the mean next-token cross-entropy per step. Writes
bench/results/DATE-qlora-vs-peft.json.

    HF_HUB_OFFLINE=1 python bench/qlora_vs_peft.py --steps 8 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(tokenizer, steps: int, batch: int = 4, length: int = 64) -> list:
    from tuneforge.data.builtin import load_builtin

    records = load_builtin("chatterbot")[: steps * batch]
    texts = [" ".join(m["content"] for m in r.fields["messages"]) for r in records]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return [(encoded["input_ids"][i:i + batch], encoded["attention_mask"][i:i + batch], labels[i:i + batch])
            for i in range(0, steps * batch, batch)]


def one_side(side: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from tuneforge.models import load_tokenizer, resolve_model_path

    folder = resolve_model_path("smollm2-135m")
    tokenizer = load_tokenizer(folder)
    data = batches(tokenizer, steps)
    started = time.perf_counter()
    if side == "tuneforge":
        import tuneforge
        from tuneforge.models import load_model

        model, _, _ = load_model("smollm2-135m", quantize="nf4")
        model = tuneforge.prepare(model, [{"lora": {"rank": 8, "alpha": 16, "targets": TARGETS}}])
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32,
                                          bnb_4bit_use_double_quant=False)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization,
                                                     dtype=torch.float32, local_files_only=True)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                 lora_dropout=0.0))
    load_seconds = time.perf_counter() - started
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    losses, times = [], []
    for input_ids, mask, labels in data:
        start = time.perf_counter()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"side": side, "losses": losses, "step_seconds": times, "peak_rss_mb": peak,
            "load_seconds": load_seconds}


def render(path: Path) -> str:
    """The side-by-side table of docs/memory.md from a results file."""
    data = json.loads(path.read_text())
    repeats = len({run["repeat"] for run in data["runs"]})
    lines = [(f"Measured {data['date']} with `{data['command']}`: {data['setup']}; {repeats} runs a side, "
              f"median [min, max] over runs; step time is each run's median step after the first."), "",
             "| side | s/step | peak RSS (MiB) | loss/token, step 1 | loss/token, mean of last 3 steps |",
             "| --- | --- | --- | --- | --- |"]
    for side, s in data["summary"].items():
        name = "tuneforge (quantize: nf4 + lora)" if side == "tuneforge" else "PEFT + BitsAndBytesConfig(nf4)"
        lines.append(
            f"| {name} | {s['median_step_seconds']:.2f} [{s['step_seconds_min_max'][0]:.2f}, "
            f"{s['step_seconds_min_max'][1]:.2f}] | {s['peak_rss_mb_median']:.0f} "
            f"[{s['peak_rss_mb_min_max'][0]:.0f}, {s['peak_rss_mb_min_max'][1]:.0f}] | {s['first_loss']:.4f} "
            f"| {s['mean_last3_loss']:.4f} [{s['last3_loss_min_max'][0]:.4f}, "
            f"{s['last3_loss_min_max'][1]:.4f}] |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one")
    parser.add_argument("--render")
    args = parser.parse_args()
    if args.render:
        print(render(Path(args.render)))
        return
    if args.one:
        print("RESULT " + json.dumps(one_side(args.one, args.steps)))
        return
    runs = []
    for repeat in range(args.repeats):
        for side in ("tuneforge", "peft"):
            done = subprocess.run([sys.executable, __file__, "--one", side, "--steps", str(args.steps)],
                                  capture_output=True, text=True, check=False)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
            runs.append({"repeat": repeat, **json.loads(line[-1][7:])})
            print(side, repeat, runs[-1]["peak_rss_mb"], statistics.median(runs[-1]["step_seconds"]),
                  flush=True)
    summary = {}
    for side in ("tuneforge", "peft"):
        mine = [r for r in runs if r["side"] == side]
        steps = [statistics.median(r["step_seconds"][1:]) for r in mine]  # the first step warms up
        peaks = [r["peak_rss_mb"] for r in mine]
        final = [statistics.mean(r["losses"][-3:]) for r in mine]
        summary[side] = {
            "median_step_seconds": statistics.median(steps), "step_seconds_min_max": [min(steps), max(steps)],
            "peak_rss_mb_median": statistics.median(peaks), "peak_rss_mb_min_max": [min(peaks), max(peaks)],
            "first_loss": mine[0]["losses"][0], "mean_last3_loss": statistics.mean(final),
            "last3_loss_min_max": [min(final), max(final)]}
    date = datetime.date.today().isoformat()
    out = Path(__file__).resolve().parent / "results" / f"{date}-qlora-vs-peft.json"
    out.write_text(json.dumps({
        "date": date, "command": f"HF_HUB_OFFLINE=1 python bench/qlora_vs_peft.py --steps {args.steps} "
                                 f"--repeats {args.repeats}",
        "setup": "SmolLM2-135M, nf4 (no double quant), fp32 compute, LoRA r8/a16 on every block linear, "
                 "AdamW lr 5e-4, batch 4 x 64 tokens, 1 thread, each side its own process",
        "summary": summary, "runs": runs}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
